"""Client of Volt (the VMThunder master): Python API and the ``volt`` command."""

from voltclient.client import Client, Volume

__all__ = ["Client", "Volume"]
