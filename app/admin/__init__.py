"""The operator's admin API and the steering bus."""
