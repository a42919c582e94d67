"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix (bad path, empty folder, bad option); the message says what to do."""
