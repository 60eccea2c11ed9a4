"""What leaves the machine about a call: the end-of-call webhook, cost, traces."""

__all__: list[str] = []  # the modules are the interface
