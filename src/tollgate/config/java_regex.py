"""DIAL's route `paths` are `java.util.regex` patterns; this turns them into Python `re` ones.

Most of the syntax is shared. What differs and is translated here:

- named groups `(?<name>...)` → `(?P<name>...)`, back references `\\k<name>` → `(?P=name)`;
- quoting `\\Q...\\E` → the text escaped;
- `\\z` → `\\Z`; Java's `\\Z` (end, before a final line break) → `(?=\\n?\\Z)`;
- `\\h`, `\\H`, `\\v`, `\\V`, `\\R`, `\\e`, `\\cX`, `\\x{h...h}`, octal `\\0ooo`;
- the POSIX classes `\\p{Lower}` ... `\\p{XDigit}` (also spelt `\\p{IsDigit}`), `\\P{...}`;
- inline flags in mid-pattern (`a(?i)b|c`), which Python only allows at the start: they become
  scoped groups, closed and reopened around each `|` so alternation is unchanged. The Java-only
  flags `d` (UNIX_LINES), `u` (UNICODE_CASE) and `U` (UNICODE_CHARACTER_CLASS) are dropped.

Patterns compile with `re.ASCII`: Java's `\\w`, `\\d`, `\\s`, `\\b` and case folding are ASCII by
default, and a request URI is ASCII text anyway. Java constructs Python has no equivalent for
(class union `[a[b]]` and intersection `&&`, `\\G`, `\\X`, `\\b{g}`, Unicode property classes)
are refused with a message that says so, at config load: a route that cannot match as written
must not be served as something else.
"""

from __future__ import annotations

import re
import warnings
from typing import Final

_POSIX: Final = {
    "lower": "a-z",
    "upper": "A-Z",
    "ascii": "\\x00-\\x7f",
    "alpha": "a-zA-Z",
    "digit": "0-9",
    "alnum": "a-zA-Z0-9",
    "punct": "!-/:-@\\[-`{-~",
    "graph": "!-~",
    "print": " -~",
    "blank": " \\t",
    "cntrl": "\\x00-\\x1f\\x7f",
    "xdigit": "0-9a-fA-F",
    "space": " \\t\\n\\x0b\\f\\r",
}
_HORIZONTAL: Final = " \\t\\xa0\\u1680\\u180e\\u2000-\\u200a\\u202f\\u205f\\u3000"
_VERTICAL: Final = "\\n\\x0b\\f\\r\\x85\\u2028\\u2029"
_SIMPLE_ESCAPES: Final = {"z": "\\Z", "Z": "(?=\\n?\\Z)", "e": "\\x1b"}
_FLAGS: Final = {"i": "i", "m": "m", "s": "s", "x": "x", "d": "", "u": "", "U": ""}
_UNSUPPORTED: Final = {
    "G": "\\G (end of the previous match)",
    "X": "\\X (grapheme cluster)",
}


class JavaRegexError(ValueError):
    """A pattern that cannot be used: invalid, or Java-only."""


def compile_java(pattern: str) -> re.Pattern[str]:
    """`pattern` (Java syntax) as a compiled Python pattern; JavaRegexError when it cannot be."""
    translated = translate(pattern)
    try:
        with warnings.catch_warnings():
            # Python warns about `[[` or `--` inside a class; Java reads them literally too.
            warnings.simplefilter("ignore", FutureWarning)
            return re.compile(translated, re.ASCII)
    except re.error as exc:
        raise JavaRegexError(f"invalid regular expression {pattern!r}: {exc}") from None


def translate(pattern: str) -> str:
    return _Translator(pattern).run()


class _Translator:
    def __init__(self, pattern: str) -> None:
        self.src = pattern
        self.pos = 0
        self.out: list[str] = []
        # Per open group: the flag groups opened inside it by mid-pattern inline flags.
        self.scopes: list[list[str]] = [[]]

    def fail(self, what: str) -> JavaRegexError:
        return JavaRegexError(f"unsupported in regular expression {self.src!r}: {what}")

    def run(self) -> str:
        src = self.src
        while self.pos < len(src):
            char = src[self.pos]
            if char == "\\":
                self.out.append(self.escape(in_class=False))
            elif char == "[":
                self.out.append(self.char_class())
            elif char == "(":
                self.open_group()
            elif char == ")":
                self.close_scoped()
                if len(self.scopes) > 1:
                    self.scopes.pop()
                self.out.append(")")
                self.pos += 1
            elif char == "|":
                opened = self.scopes[-1]
                self.out.append(")" * len(opened) + "|" + "".join(opened))
                self.pos += 1
            else:
                self.out.append(char)
                self.pos += 1
        self.close_scoped()
        return "".join(self.out)

    def close_scoped(self) -> None:
        self.out.append(")" * len(self.scopes[-1]))

    def open_group(self) -> None:
        src = self.src
        rest = src[self.pos :]
        named = re.match(r"\(\?<([A-Za-z][A-Za-z0-9]*)>", rest)
        if named:
            self.out.append(f"(?P<{named[1]}>")
            self.pos += named.end()
            self.scopes.append([])
            return
        flags = re.match(r"\(\?([idmsuxU]*)(?:-([idmsuxU]*))?(\)|:)", rest)
        if flags and (flags[1] or flags[2] is not None):
            on = "".join(_FLAGS[f] for f in flags[1])
            off = "".join(_FLAGS[f] for f in flags[2] or "")
            off = "".join(f for f in off if f in "imsx")
            spec = on + (f"-{off}" if off else "")
            self.pos += flags.end()
            if flags[3] == ":":
                self.out.append(f"(?{spec}:" if spec else "(?:")
                self.scopes.append([])
            elif spec:
                # Java applies these to the rest of the enclosing group; Python only allows
                # flags at the very start, so they open a scoped group closed with it.
                opener = f"(?{spec}:"
                self.out.append(opener)
                self.scopes[-1].append(opener)
            return
        self.out.append("(")
        self.pos += 1
        self.scopes.append([])

    def escape(self, *, in_class: bool) -> str:
        src = self.src
        if self.pos + 1 >= len(src):
            raise JavaRegexError(f"invalid regular expression {src!r}: trailing backslash")
        char = src[self.pos + 1]
        self.pos += 2
        if char == "Q":
            end = src.find("\\E", self.pos)
            text = src[self.pos :] if end < 0 else src[self.pos : end]
            self.pos = len(src) if end < 0 else end + 2
            return "".join("\\" + c if not c.isalnum() else c for c in text)
        if char == "E":
            return ""  # a \E without \Q: Java ignores it
        if char in _UNSUPPORTED:
            raise self.fail(_UNSUPPORTED[char])
        if char in "hHvV":
            body = _HORIZONTAL if char in "hH" else _VERTICAL
            if char.islower():
                return body if in_class else f"[{body}]"
            if in_class:
                raise self.fail(f"\\{char} inside a character class")
            return f"[^{body}]"
        if char == "R":
            if in_class:
                raise self.fail("\\R inside a character class")
            return f"(?:\\r\\n|[{_VERTICAL}])"
        if char in "zZ" and not in_class:
            return _SIMPLE_ESCAPES[char]
        if char == "e":
            return _SIMPLE_ESCAPES[char]
        if char == "c":
            if self.pos >= len(src):
                raise JavaRegexError(f"invalid regular expression {src!r}: \\c needs a letter")
            control = ord(src[self.pos]) ^ 64
            self.pos += 1
            return f"\\x{control:02x}"
        if char == "x" and src.startswith("{", self.pos):
            end = src.find("}", self.pos)
            digits = src[self.pos + 1 : end] if end > 0 else ""
            if not re.fullmatch(r"[0-9a-fA-F]{1,6}", digits) or int(digits, 16) > 0x10FFFF:
                raise JavaRegexError(f"invalid regular expression {src!r}: bad \\x{{...}}")
            self.pos = end + 1
            return f"\\U{int(digits, 16):08x}"
        if char == "0":
            octal = re.match(r"[0-3][0-7]{0,2}|[0-7]{1,2}", src[self.pos :])
            if octal is None:
                raise JavaRegexError(f"invalid regular expression {src!r}: bad octal escape")
            self.pos += octal.end()
            return f"\\x{int(octal[0], 8):02x}"
        if char == "k" and not in_class:
            name = re.match(r"<([A-Za-z][A-Za-z0-9]*)>", src[self.pos :])
            if name is None:
                raise JavaRegexError(f"invalid regular expression {src!r}: bad \\k<name>")
            self.pos += name.end()
            return f"(?P={name[1]})"
        if char == "b" and src.startswith("{", self.pos):
            raise self.fail("\\b{...} boundaries")
        if char in "pP":
            return self.property_class(negated=char == "P", in_class=in_class)
        return "\\" + char

    def property_class(self, *, negated: bool, in_class: bool) -> str:
        src = self.src
        if src.startswith("{", self.pos):
            end = src.find("}", self.pos)
            if end < 0:
                raise JavaRegexError(f"invalid regular expression {src!r}: unclosed \\p{{")
            name = src[self.pos + 1 : end]
            self.pos = end + 1
        else:
            name = src[self.pos : self.pos + 1]
            self.pos += 1
        key = name[2:] if name.startswith("Is") else name
        body = _POSIX.get(key.lower())
        if body is None:
            raise self.fail(f"the character property \\p{{{name}}}")
        if not negated:
            return body if in_class else f"[{body}]"
        if in_class:
            raise self.fail(f"\\P{{{name}}} inside a character class")
        return f"[^{body}]"

    def char_class(self) -> str:
        """One `[...]`; Java's union (`[a[b]]`) and intersection (`&&`) are refused."""
        src = self.src
        self.pos += 1
        parts = ["["]
        if src.startswith("^", self.pos):
            parts.append("^")
            self.pos += 1
        first = True
        while self.pos < len(src):
            char = src[self.pos]
            if char == "]" and not first:
                self.pos += 1
                parts.append("]")
                return "".join(parts)
            first = False
            if char == "\\":
                parts.append(self.escape(in_class=True))
            elif char == "[":
                raise self.fail("a character class inside a character class (union)")
            elif src.startswith("&&", self.pos):
                raise self.fail("character class intersection (&&)")
            else:
                parts.append("\\]" if char == "]" else char)
                self.pos += 1
        raise JavaRegexError(f"invalid regular expression {src!r}: unclosed character class")
