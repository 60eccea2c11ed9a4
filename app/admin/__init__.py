"""The operator's admin API and the steering bus."""

__all__: list[str] = []  # the modules are the interface
