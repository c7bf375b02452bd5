"""Example workers shipped with runner, used by the specs in specs/."""
