"""Services that run beside the phone agent, to show it working against a real backend."""
