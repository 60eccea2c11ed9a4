"""Model providers behind one `Engine` interface."""

__all__: list[str] = []  # the modules are the interface
