"""Errors a user can cause. The CLI turns each into a one-line message and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for (name, parameter, path, data, resources).

    The message is one line that says what to do about it.
    """


class MethodError(UserError, ValueError):
    """An unknown method, an unknown parameter or a parameter outside its valid range."""


class PatchError(UserError, TypeError):
    """A model that the generic patch cannot turn into a token-reducing one."""
