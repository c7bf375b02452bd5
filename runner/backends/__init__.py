"""The unit loop's backends: Ray (`ray.py`) and virtual time (`virtual.py`)."""
