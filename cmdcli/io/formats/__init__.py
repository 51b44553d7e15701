"""One module per checkpoint layout; :mod:`cmdcli.io.registry` lists them in one table."""
