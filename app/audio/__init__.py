"""Audio where something must listen or a provider cannot take mu-law: codec, resampling, WAV."""
