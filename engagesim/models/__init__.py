"""Behaviour models: plain training code a unit test can call, with thin Ray Train wrappers around it."""
