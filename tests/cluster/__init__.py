"""A stand-in Determined 0.38.1 master + agent, and the end-to-end tests that run on it."""
