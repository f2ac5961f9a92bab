"""A plugin that raises an exception whose __str__ itself raises."""


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("__str__ is broken too")


raise Unprintable()
