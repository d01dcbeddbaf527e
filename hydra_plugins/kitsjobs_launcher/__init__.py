"""Hydra discovers launchers in the ``hydra_plugins`` namespace; the code lives in kitsjobs.launcher."""
