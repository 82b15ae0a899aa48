"""Declaring node parameters so that a wrong one is one line naming it and what was expected.

Why: rclpy raises ``InvalidParameterTypeException`` (a traceback) for ``-p max_age:=abc``, and also for
``-p max_age:=1`` (an integer where a double is declared), the commonest slip. Here an integer for a
double parameter is taken as that number, and anything else is a :class:`VqbetError` that the nodes
print as ``<node>: error: parameter max_age: expected a number (double), got 'abc' (string)``, exit 2.
"""

from __future__ import annotations

from vqbet_core.errors import VqbetError

_KIND = {bool: "true or false (bool)", int: "an integer", float: "a number (double)", str: "a string"}


def _expected(default) -> str:
    if isinstance(default, list):
        return "a list of strings, e.g. [a, b]" if all(isinstance(v, str) for v in default) else "a list"
    return _KIND.get(type(default), type(default).__name__)


def declare(node, name: str, default, description: str, array: bool = False, any_type: bool = False):
    """``node.declare_parameter(name, default)`` -> its value; a value of the wrong type is one line."""
    from rcl_interfaces.msg import ParameterDescriptor, ParameterType
    from rclpy.exceptions import InvalidParameterTypeException

    desc = ParameterDescriptor(description=description, dynamic_typing=any_type)
    if array:
        desc.type = ParameterType.PARAMETER_STRING_ARRAY
    try:
        return node.declare_parameter(name, default, desc).value
    except InvalidParameterTypeException:
        pass
    # the override has another type: read it with dynamic typing, then accept it or say what was expected
    value = node.declare_parameter(name, default, ParameterDescriptor(description=description,
                                                                       dynamic_typing=True)).value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    shown = f"'{value}'" if isinstance(value, str) else repr(value)
    kind = "string" if isinstance(value, str) else type(value).__name__
    raise VqbetError(f"parameter {name}: expected {_expected(default)}, got {shown} ({kind})")
