"""Commands as functions: take paths and objects, return dataclasses, report progress via callbacks."""
