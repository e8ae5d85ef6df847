"""Test doubles shared by the unit (and some functional) tests, one module per faked thing:
``driver`` (virtman's block-stack driver), ``volt`` (Volt as a node sees it), ``settings``
(virtman settings on a temporary directory), ``execute`` (brick's command executor),
``rtslib`` (rtslib-fb over an in-memory configfs), ``clock`` (a clock tests move),
``qmp`` (a QMP server on a unix socket)."""
