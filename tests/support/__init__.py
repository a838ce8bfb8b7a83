"""What the tests share: helpers with public names, imported by test modules and fixtures
(tests/conftest.py). No test module imports another."""
