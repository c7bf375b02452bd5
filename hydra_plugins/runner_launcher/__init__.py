"""The runner launcher for Hydra sweeps (`hydra/launcher=runner`)."""
