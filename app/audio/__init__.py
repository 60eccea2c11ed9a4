"""Audio where something must listen or a provider cannot take mu-law: codec, resampling, WAV."""

__all__: list[str] = []  # the modules are the interface
