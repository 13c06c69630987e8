"""The one exception type for bad user input.

Every check on files, shapes, dtypes and values a user hands to jaxgen raises
:class:`InputError` with a message that names the thing (file, argument,
shape, value) and says how to fix it. Command-line entry points catch it and
print the message as one line with exit code 2.
"""


class InputError(ValueError):
    """Bad user input: a missing or corrupt file, a wrong shape, dtype or value."""
