"""The one error type users see: a single line naming the file or field, exit status 2."""


class FusechatError(Exception):
    """Bad input or a failed precondition; the CLI prints ``fusechat: error: <msg>`` and exits 2."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none): what a
    one-line error quotes from a library's multi-line traceback text."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
