"""Console scripts of Volt."""

import os

# eventlet comes in through oslo.privsep and oslo.messaging (we never monkey-patch) and, by
# default, loads dnspython for a green resolver nothing here uses: a fifth of a daemon's
# imports (0.17 of 0.9 s on the host; under TCG in a test guest, over a minute).
os.environ.setdefault("EVENTLET_NO_GREENDNS", "yes")
