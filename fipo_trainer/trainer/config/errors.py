"""`ConfigError`: every config problem found, one message each, naming the key and the fix.

Why its own module: the sections, the cross-section rules and the machine checks all report
through it, and callers (the CLI, Ray workers) catch one type whatever found the problem.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """One or more config problems; ``errors`` lists them, one message per problem."""

    def __init__(self, errors: list[str] | str) -> None:
        # once each: a key two checks find wrong (a section's and a rule's) is one problem
        self.errors = [errors] if isinstance(errors, str) else list(dict.fromkeys(errors))
        if len(self.errors) == 1:
            message = f"invalid training config: {self.errors[0]}"
        else:
            message = "invalid training config:\n" + "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(message)

    def __reduce__(self):  # picklable (through Ray) with its error list
        return (type(self), (self.errors,))


def _raise(errors: list[str]) -> None:
    """Raise `ConfigError` listing ``errors`` (a section's validate() ends with this)."""
    if errors:
        raise ConfigError(errors)
