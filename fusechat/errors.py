"""The one error type users see: a single line naming the file or field, exit status 2."""


class FusechatError(Exception):
    """Bad input or a failed precondition; the CLI prints ``fusechat: error: <msg>`` and exits 2."""
