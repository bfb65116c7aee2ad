"""
The calculator: the inference-time tool behind <|python_start|>EXPR<|python_end|>.

`use_calculator(expr) -> str` walks the expression's syntax tree with an allow-list (int/float/str
literals, + - * / // % **, unary +/-, comparisons, len/abs/round/min/max, a few string methods such as
.count, indexing and slicing of strings). It never calls eval/exec/compile, and every operation is
bounded *before* it runs (huge powers, string repeats and replaces are refused), so it needs no timer
and works from any thread. It never raises: the result as text, GSM8K style (48/2 -> "24", 7/2 ->
"3.5"), or a text starting with "Error:", which the engine injects like any other result.
Whole programs (HumanEval) run in nanochat.sandbox instead.
"""

import ast
import math
import re

MAX_EXPR_CHARS = 256
MAX_INT_BITS = 4096  # ~1,200 decimal digits: big enough for any arithmetic a chat answer needs
MAX_SEQ_LEN = 10_000  # longest string (or list, from .split) an expression may build
FUNCTIONS = {"len": len, "abs": abs, "round": round, "min": min, "max": max}
STR_METHODS = {"count", "upper", "lower", "strip", "find", "index", "startswith", "endswith", "replace", "split"}
COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
           ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b}


class CalculatorError(Exception):
    pass


def _number(*values):
    return all(isinstance(v, (int, float)) for v in values)


def _checked(value):
    """Every intermediate result passes through here: real numbers of bounded size, short strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise CalculatorError("number too large")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("number too large")
        return value
    if isinstance(value, (str, list)):
        if len(value) > MAX_SEQ_LEN:
            raise CalculatorError("result too long")
        return value
    raise CalculatorError("the result is not a real number" if isinstance(value, complex) else "unsupported value")


def _binop(op, a, b):
    if isinstance(op, ast.Pow):
        if not _number(a, b):
            raise CalculatorError("** needs numbers")
        # bound the result's size before computing it: 9**9**9 is refused, not attempted
        if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 and b * math.log2(abs(a)) > MAX_INT_BITS:
            raise CalculatorError("number too large")
        return a ** b  # float powers overflow (OverflowError) instead of growing
    if isinstance(op, ast.Mult) and (isinstance(a, (str, list)) or isinstance(b, (str, list))):
        seq, times = (a, b) if isinstance(a, (str, list)) else (b, a)
        if not isinstance(times, int) or isinstance(times, bool) or len(seq) * max(times, 0) > MAX_SEQ_LEN:
            raise CalculatorError("repeat too long")
        return seq * times
    if isinstance(op, ast.Add) and isinstance(a, (str, list)) and type(a) is type(b):
        return a + b  # both operands are bounded, so the sum is
    if not _number(a, b):
        raise CalculatorError("arithmetic needs numbers")
    # '%' only between numbers: string formatting ('%*d' % (10**9, 1)) could allocate without bound
    ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.Div: lambda: a / b,
           ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b}
    if type(op) not in ops:
        raise CalculatorError(f"operator {type(op).__name__} is not allowed")
    return ops[type(op)]()


def _call(node):
    if node.keywords:
        raise CalculatorError("keyword arguments are not allowed")
    args = [_eval(a) for a in node.args]  # a *starred argument is refused by _eval
    if isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        name = node.func.id
        if name == "round" and len(args) == 2 and isinstance(args[1], int) and abs(args[1]) > 100:
            raise CalculatorError("round() digits out of range")  # round(1, -10**9) computes 10**10**9
        if name in ("round", "abs") and not _number(*args):
            raise CalculatorError(f"{name}() needs numbers")
        return FUNCTIONS[name](*args)
    if isinstance(node.func, ast.Attribute) and node.func.attr in STR_METHODS:
        target, method = _eval(node.func.value), node.func.attr
        if not isinstance(target, str) or not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in args):
            raise CalculatorError(f".{method}() works on strings only")
        if method == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            if len(target) + (target.count(args[0]) * len(args[1])) > MAX_SEQ_LEN:
                raise CalculatorError("result too long")
        return getattr(target, method)(*args)
    raise CalculatorError("only len, abs, round, min, max and a few string methods can be called")


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):  # not bool/None/bytes/complex
        return _checked(node.value)
    if isinstance(node, ast.BinOp):
        return _checked(_binop(node.op, _eval(node.left), _eval(node.right)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        if not _number(value):
            raise CalculatorError("a sign needs a number")
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.Compare):  # chained, short-circuiting like Python: 1 < 2 < 3
        left = _eval(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            if type(op) not in COMPARE:
                raise CalculatorError(f"comparison {type(op).__name__} is not allowed")
            right = _eval(comparator)
            if not COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call):
        return _checked(_call(node))
    if isinstance(node, ast.Subscript):  # "word"[0], "word"[::-1], "a b".split()[1]
        target = _eval(node.value)
        if isinstance(node.slice, ast.Slice):
            parts = [None if p is None else _eval(p) for p in (node.slice.lower, node.slice.upper, node.slice.step)]
            index = slice(*parts)
            if not all(p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in parts):
                raise CalculatorError("slice bounds must be integers")
        else:
            index = _eval(node.slice)
            if not isinstance(index, int) or isinstance(index, bool):
                raise CalculatorError("index must be an integer")
        if not isinstance(target, (str, list)):
            raise CalculatorError("only strings can be indexed")
        return target[index]
    raise CalculatorError(f"{type(node).__name__} is not allowed")


def format_result(value):
    """GSM8K style: integers (and integral floats) without '.0', other floats to 6 decimals without trailing zeros."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        text = f"{value:.6f}".rstrip("0").rstrip(".")
        return text if text not in ("0", "-0") else f"{value:.3g}"  # tiny values: keep their digits
    return str(value)  # int, bool ("True"), str (its text), list


STRING_LITERAL = re.compile(r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")
THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def strip_thousands_commas(expr):
    """'1,000*3' -> '1000*3' (GSM8K writes numbers that way), leaving string literals alone.
    The price: 'max(1,234)' reads as max(1234); write 'max(1, 234)'."""
    parts = STRING_LITERAL.split(expr)  # odd indices are the string literals
    return "".join(p if i % 2 else THOUSANDS_COMMA.sub("", p) for i, p in enumerate(parts))


def use_calculator(expr):
    """Evaluate one calculator expression. Returns the result as text, or a text starting with 'Error:'; never raises."""
    if not isinstance(expr, str):
        return "Error: not an expression"
    expr = expr.strip()
    if not expr:
        return "Error: empty expression"
    if len(expr) > MAX_EXPR_CHARS:
        return f"Error: expression longer than {MAX_EXPR_CHARS} characters"
    try:
        return format_result(_eval(ast.parse(strip_thousands_commas(expr), mode="eval")))
    except ZeroDivisionError:
        return "Error: division by zero"
    except SyntaxError:
        return "Error: invalid syntax"
    except Exception as e:  # CalculatorError, TypeError, OverflowError, RecursionError, MemoryError, ...
        return f"Error: {e}" if str(e) else f"Error: {type(e).__name__}"
