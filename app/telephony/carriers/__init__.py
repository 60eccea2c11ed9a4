"""One module per carrier, each an `app.telephony.base.Edge`."""

__all__: list[str] = []  # the modules are the interface
