"""Model providers behind one `Engine` interface."""
