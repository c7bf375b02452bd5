"""Generate problems.jsonl, the PyChecker example dataset, deterministically.

The dataset is code, not hand-edited JSON, so that it can be regenerated and
reviewed as readable Python. Each problem has a reference solution and tests;
extra rows are derived from it: an alternative correct solution, a wrong one
that compiles but fails the asserts, a syntax error, or a busy loop that hangs
the tests. Row order and content depend only on this file, so reruns produce
byte-identical output.

Run: python runner/specs/data/pychecker/make_problems.py
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).with_name("problems.jsonl")


@dataclass(frozen=True)
class Problem:
    """One small task: its solutions and the asserts that tell right from wrong."""

    name: str
    correct: str
    tests: str
    alt: str | None = None
    wrong: str | None = None
    syntax: str | None = None
    loop: str | None = None


def src(text: str) -> str:
    """Dedent a source literal so the definitions below can be indented naturally."""
    return textwrap.dedent(text).strip() + "\n"


PROBLEMS: list[Problem] = [
    Problem(
        name="add",
        correct=src("""
            def add(a, b):
                return a + b
        """),
        tests=src("""
            assert add(1, 2) == 3
            assert add(-4, 4) == 0
            assert add(10, 15) == 25
        """),
        alt=src("""
            def add(a, b):
                return sum((a, b))
        """),
        wrong=src("""
            def add(a, b):
                return a - b
        """),
        syntax=src("""
            def add(a, b)
                return a + b
        """),
        loop=src("""
            def add(a, b):
                while True:
                    pass
                return a + b
        """),
    ),
    Problem(
        name="reverse_string",
        correct=src("""
            def reverse_string(s):
                return s[::-1]
        """),
        tests=src("""
            assert reverse_string("abc") == "cba"
            assert reverse_string("") == ""
            assert reverse_string("racecar") == "racecar"
            assert reverse_string("ab") == "ba"
        """),
        alt=src("""
            def reverse_string(s):
                return "".join(reversed(s))
        """),
        wrong=src("""
            def reverse_string(s):
                return s[1:][::-1]
        """),
        syntax=src("""
            def reverse_string(s):
                return s[::-1
        """),
    ),
    Problem(
        name="fizzbuzz",
        correct=src("""
            def fizzbuzz(n):
                if n % 15 == 0:
                    return "FizzBuzz"
                if n % 3 == 0:
                    return "Fizz"
                if n % 5 == 0:
                    return "Buzz"
                return str(n)
        """),
        tests=src("""
            assert fizzbuzz(1) == "1"
            assert fizzbuzz(3) == "Fizz"
            assert fizzbuzz(10) == "Buzz"
            assert fizzbuzz(30) == "FizzBuzz"
        """),
        alt=src("""
            def fizzbuzz(n):
                out = ("Fizz" if n % 3 == 0 else "") + ("Buzz" if n % 5 == 0 else "")
                return out or str(n)
        """),
        wrong=src("""
            def fizzbuzz(n):
                if n % 3 == 0:
                    return "Fizz"
                if n % 5 == 0:
                    return "Buzz"
                return str(n)
        """),
        syntax=src("""
            def fizzbuzz(n):
                if n % 15 == 0
                    return "FizzBuzz"
                return str(n)
        """),
    ),
    Problem(
        name="is_prime",
        correct=src("""
            def is_prime(n):
                if n < 2:
                    return False
                i = 2
                while i * i <= n:
                    if n % i == 0:
                        return False
                    i += 1
                return True
        """),
        tests=src("""
            assert is_prime(2)
            assert is_prime(13)
            assert not is_prime(1)
            assert not is_prime(9)
            assert not is_prime(0)
        """),
        alt=src("""
            def is_prime(n):
                return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))
        """),
        wrong=src("""
            def is_prime(n):
                return n % 2 == 1
        """),
        syntax=src("""
            def is_prime(n):
                return n >= 2 and all(n % d for d in range(2, n)
        """),
        loop=src("""
            def is_prime(n):
                d = 2
                while True:
                    d = d
                return n > 1
        """),
    ),
    Problem(
        name="factorial",
        correct=src("""
            def factorial(n):
                result = 1
                for i in range(2, n + 1):
                    result *= i
                return result
        """),
        tests=src("""
            assert factorial(0) == 1
            assert factorial(1) == 1
            assert factorial(5) == 120
            assert factorial(10) == 3628800
        """),
        alt=src("""
            def factorial(n):
                return 1 if n <= 1 else n * factorial(n - 1)
        """),
        wrong=src("""
            def factorial(n):
                result = 1
                for i in range(2, n):
                    result *= i
                return result
        """),
        syntax=src("""
            def factorial(n):
                result = 1
                for i in range(2, n + 1):
                result *= i
                return result
        """),
    ),
    Problem(
        name="gcd",
        correct=src("""
            def gcd(a, b):
                while b:
                    a, b = b, a % b
                return abs(a)
        """),
        tests=src("""
            assert gcd(12, 18) == 6
            assert gcd(7, 5) == 1
            assert gcd(0, 9) == 9
            assert gcd(100, 75) == 25
        """),
        alt=src("""
            def gcd(a, b):
                return abs(a) if b == 0 else gcd(b, a % b)
        """),
        wrong=src("""
            def gcd(a, b):
                return min(a, b)
        """),
        syntax=src("""
            def gcd(a, b):
                while b:
                    a, b = b, a % b
                return return a
        """),
        loop=src("""
            def gcd(a, b):
                while True:
                    a, b = a, b
                return a
        """),
    ),
    Problem(
        name="is_palindrome",
        correct=src("""
            def is_palindrome(s):
                cleaned = [c.lower() for c in s if c.isalnum()]
                return cleaned == cleaned[::-1]
        """),
        tests=src("""
            assert is_palindrome("racecar")
            assert is_palindrome("A man, a plan, a canal: Panama")
            assert not is_palindrome("hello")
            assert is_palindrome("")
        """),
        alt=src("""
            def is_palindrome(s):
                t = "".join(c.lower() for c in s if c.isalnum())
                return all(t[i] == t[-1 - i] for i in range(len(t) // 2))
        """),
        wrong=src("""
            def is_palindrome(s):
                return s == s[::-1]
        """),
        syntax=src("""
            def is_palindrome(s):
                cleaned = [c.lower() for c in s if c.isalnum()
                return cleaned == cleaned[::-1]
        """),
    ),
    Problem(
        name="max_of_list",
        correct=src("""
            def max_of_list(xs):
                best = xs[0]
                for x in xs[1:]:
                    if x > best:
                        best = x
                return best
        """),
        tests=src("""
            assert max_of_list([1, 5, 3]) == 5
            assert max_of_list([-3, -1, -2]) == -1
            assert max_of_list([7]) == 7
        """),
        alt=src("""
            def max_of_list(xs):
                return sorted(xs)[-1]
        """),
        wrong=src("""
            def max_of_list(xs):
                best = 0
                for x in xs:
                    if x > best:
                        best = x
                return best
        """),
        syntax=src("""
            def max_of_list(xs):
                best = xs[0]
                for x in xs[1:]:
                    if x > best: best = x else: pass
                return best
        """),
    ),
    Problem(
        name="count_vowels",
        correct=src("""
            def count_vowels(s):
                return sum(1 for c in s.lower() if c in "aeiou")
        """),
        tests=src("""
            assert count_vowels("hello") == 2
            assert count_vowels("AEIOU") == 5
            assert count_vowels("rhythm") == 0
        """),
        alt=src("""
            def count_vowels(s):
                n = 0
                for c in s:
                    if c in "aeiouAEIOU":
                        n += 1
                return n
        """),
        wrong=src("""
            def count_vowels(s):
                return sum(1 for c in s if c in "aeiou")
        """),
        syntax=src("""
            def count_vowels(s):
                return sum(1 for c in s.lower() if c in "aeiou))
        """),
        loop=src("""
            def count_vowels(s):
                n = 0
                while True:
                    pass
                return n
        """),
    ),
    Problem(
        name="flatten",
        correct=src("""
            def flatten(xs):
                out = []
                for x in xs:
                    if isinstance(x, list):
                        out.extend(flatten(x))
                    else:
                        out.append(x)
                return out
        """),
        tests=src("""
            assert flatten([1, [2, [3, 4]], 5]) == [1, 2, 3, 4, 5]
            assert flatten([]) == []
            assert flatten([[[]]]) == []
        """),
        alt=src("""
            def flatten(xs):
                out, stack = [], [iter(xs)]
                while stack:
                    for x in stack[-1]:
                        if isinstance(x, list):
                            stack.append(iter(x))
                            break
                        out.append(x)
                    else:
                        stack.pop()
                return out
        """),
        wrong=src("""
            def flatten(xs):
                out = []
                for x in xs:
                    if isinstance(x, list):
                        out.extend(x)
                    else:
                        out.append(x)
                return out
        """),
        syntax=src("""
            def flatten(xs):
                out = []
                for x in xs:
                    out += flatten(x) if isinstance(x, list) else [x]
              return out
        """),
    ),
    Problem(
        name="fib",
        correct=src("""
            def fib(n):
                a, b = 0, 1
                for _ in range(n):
                    a, b = b, a + b
                return a
        """),
        tests=src("""
            assert fib(0) == 0
            assert fib(1) == 1
            assert fib(10) == 55
            assert fib(20) == 6765
        """),
        wrong=src("""
            def fib(n):
                a, b = 1, 1
                for _ in range(n):
                    a, b = b, a + b
                return a
        """),
        loop=src("""
            def fib(n):
                a, b = 0, 1
                while True:
                    pass
                return a
        """),
    ),
    Problem(
        name="sum_of_digits",
        correct=src("""
            def sum_of_digits(n):
                return sum(int(d) for d in str(abs(n)))
        """),
        tests=src("""
            assert sum_of_digits(123) == 6
            assert sum_of_digits(0) == 0
            assert sum_of_digits(-45) == 9
        """),
        wrong=src("""
            def sum_of_digits(n):
                return sum(int(d) for d in str(n))
        """),
    ),
    Problem(
        name="count_words",
        correct=src("""
            def count_words(s):
                return len(s.split())
        """),
        tests=src("""
            assert count_words("the quick brown fox") == 4
            assert count_words("") == 0
            assert count_words("  spaced   out  ") == 2
        """),
        wrong=src("""
            def count_words(s):
                return s.count(" ") + 1
        """),
    ),
    Problem(
        name="unique_sorted",
        correct=src("""
            def unique_sorted(xs):
                return sorted(set(xs))
        """),
        tests=src("""
            assert unique_sorted([3, 1, 3, 2, 1]) == [1, 2, 3]
            assert unique_sorted([]) == []
        """),
        wrong=src("""
            def unique_sorted(xs):
                return sorted(xs)
        """),
    ),
    Problem(
        name="celsius_to_fahrenheit",
        correct=src("""
            def celsius_to_fahrenheit(c):
                return c * 9 / 5 + 32
        """),
        tests=src("""
            assert celsius_to_fahrenheit(0) == 32
            assert celsius_to_fahrenheit(100) == 212
            assert celsius_to_fahrenheit(-40) == -40
        """),
        wrong=src("""
            def celsius_to_fahrenheit(c):
                return (c + 32) * 9 / 5
        """),
    ),
    Problem(
        name="binary_search",
        correct=src("""
            def binary_search(xs, target):
                lo, hi = 0, len(xs) - 1
                while lo <= hi:
                    mid = (lo + hi) // 2
                    if xs[mid] == target:
                        return mid
                    if xs[mid] < target:
                        lo = mid + 1
                    else:
                        hi = mid - 1
                return -1
        """),
        tests=src("""
            assert binary_search([1, 3, 5, 7, 9], 7) == 3
            assert binary_search([1, 3, 5, 7, 9], 1) == 0
            assert binary_search([1, 3, 5, 7, 9], 4) == -1
            assert binary_search([], 1) == -1
        """),
    ),
    Problem(
        name="anagrams",
        correct=src("""
            def anagrams(a, b):
                return sorted(a.replace(" ", "").lower()) == sorted(b.replace(" ", "").lower())
        """),
        tests=src("""
            assert anagrams("listen", "silent")
            assert anagrams("Dormitory", "dirty room")
            assert not anagrams("abc", "abd")
        """),
    ),
    Problem(
        name="run_length_encode",
        correct=src("""
            def run_length_encode(s):
                out = []
                for c in s:
                    if out and out[-1][0] == c:
                        out[-1][1] += 1
                    else:
                        out.append([c, 1])
                return "".join(f"{c}{n}" for c, n in out)
        """),
        tests=src("""
            assert run_length_encode("aaabcc") == "a3b1c2"
            assert run_length_encode("") == ""
            assert run_length_encode("z") == "z1"
        """),
    ),
    Problem(
        name="transpose",
        correct=src("""
            def transpose(m):
                return [list(row) for row in zip(*m)]
        """),
        tests=src("""
            assert transpose([[1, 2, 3], [4, 5, 6]]) == [[1, 4], [2, 5], [3, 6]]
            assert transpose([[1]]) == [[1]]
            assert transpose([]) == []
        """),
    ),
    Problem(
        name="second_largest",
        correct=src("""
            def second_largest(xs):
                distinct = sorted(set(xs))
                return distinct[-2] if len(distinct) >= 2 else None
        """),
        tests=src("""
            assert second_largest([4, 1, 4, 3]) == 3
            assert second_largest([5, 5]) is None
            assert second_largest([-1, -2]) == -2
        """),
    ),
]


def rows() -> list[dict[str, str]]:
    """Expand every problem into its dataset rows, checking each row's claimed kind."""
    out: list[dict[str, str]] = []
    for number, problem in enumerate(PROBLEMS, start=1):
        variants = [
            ("correct", "correct", problem.correct),
            ("correct2", "correct", problem.alt),
            ("wrong", "wrong", problem.wrong),
            ("syntax", "syntax", problem.syntax),
            ("loop", "loop", problem.loop),
        ]
        for suffix, kind, candidate in variants:
            if candidate is None:
                continue
            # Cheap self-check so a typo cannot silently turn a row into another kind.
            compiles = _compiles(candidate)
            if compiles == (kind == "syntax"):
                raise ValueError(f"{problem.name}/{suffix}: compiles={compiles} for {kind}")
            out.append(
                {
                    "problem_id": f"p{number:03d}-{suffix}",
                    "candidate": candidate,
                    "tests": problem.tests,
                    "kind": kind,
                }
            )
    return out


def _compiles(source: str) -> bool:
    """Whether ``source`` compiles, the same test PyChecker uses for its 0.0 tier."""
    try:
        compile(source, "<candidate>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def main() -> None:
    """Write the dataset next to this script and print a per-kind summary."""
    data = rows()
    with OUT.open("w", encoding="utf-8", newline="\n") as fh:
        for row in data:
            fh.write(json.dumps(row, ensure_ascii=True) + "\n")
    counts: dict[str, int] = {}
    for row in data:
        counts[row["kind"]] = counts.get(row["kind"], 0) + 1
    print(f"wrote {len(data)} rows to {OUT}: {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    main()
