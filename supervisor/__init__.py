"""The trainctl supervisor: keeps a training run alive. Never imports torch."""
