"""Stage kinds written outside `runner/`, to show (and test) that a kind is its own package."""
