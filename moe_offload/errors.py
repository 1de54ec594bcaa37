"""The one exception type a user of moe-offload can hit for bad input."""


class MoEOffloadError(Exception):
    """Bad input or an impossible request: the message says what is wrong and what to do."""
