"""The one exception type users see: a bad input, named, with its fix.

The CLI prints `jaxdp: error: <message>` and exits 2 without a traceback; the library raises it.
"""


class JaxdpError(Exception):
  """A user-facing error whose message names the offending field or path and how to fix it."""
