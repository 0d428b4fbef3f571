"""The command line: OCP's ``main.py`` flags, the data tools and the run modes."""
