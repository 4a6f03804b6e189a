"""Categories of a document for data preparation: natural language and programming language.

Pure functions of the text (and, for code, the file path), deterministic and free of Beam.

`language` asks py3langid (a fork of Lui & Baldwin's langid.py: a byte n-gram naive Bayes model
with about 140 labels, bundled with the package, so nothing is downloaded) about the first
LANGID_CHARS characters. Its labels are ISO 639-1 codes where one exists ("en", "fr"), ISO 639-3
otherwise ("ace", "yue"), and "zxx" for no linguistic content; text without any letter is "und".
The model walks every byte in Python (about 1.5 us a byte), so the prefix bounds its cost.

`code_language` knows code by the file extension when there is one in _EXTENSIONS (and knows that
.md, .txt, .rst, ... are not code); otherwise it looks at the first CODE_SAMPLE_CHARS characters:
1. a shebang line (#!/bin/bash, #!/usr/bin/env python3) names the language;
2. otherwise at least half of the non-blank lines (and at least three) must look like code
   (_CODE_LINE: declarations, imports, assignments, calls, lines ending in ";" or "{", lone
   closing brackets, Python block openers, preprocessor lines, C-style comments, markup tags);
   triple-quoted docstrings, "#" comment lines and Markdown headings count neither way;
3. then per-language markers (`self.`, `std::`, `console.log`, `:=`, `fi`, `SELECT`, ...) pick the
   language; code-like text with none of them is "other".
Limits: documentation with code examples, and prose about code, stays prose (by design, so the
quality filters still see it); a short snippet (under three lines), code whose first
CODE_SAMPLE_CHARS are mostly prose (a long licence or module docstring in // or /* */ comments),
and languages without markers below may be missed or called "other"; markers can confuse close
relatives (C / C++, JavaScript / TypeScript). Measured: all of a hand-made set of C, C++, Java,
JavaScript, Go, Rust, shell, SQL, HTML, CSS and JSON files; 183 of 213 Python files of fmjax and
flax (the misses: docstring-only __init__ files, docstrings cut by the sample); no document of
../shared/data/text and no pydoc topic.
"""

import functools
import json
import os
import re

import py3langid.langid

LANGID_CHARS = 2000
CODE_SAMPLE_CHARS = 10_000
_MIN_CODE_LINES = 3
_MIN_CODE_LINE_FRACTION = 0.5

_EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".pyx": "python", ".js": "javascript", ".mjs": "javascript",
    ".cjs": "javascript", ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript",
    ".java": "java", ".kt": "kotlin", ".scala": "scala", ".c": "c", ".h": "c", ".cc": "cpp",
    ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp", ".cs": "csharp", ".go": "go",
    ".rs": "rust", ".rb": "ruby", ".php": "php", ".pl": "perl", ".lua": "lua", ".r": "r",
    ".jl": "julia", ".hs": "haskell", ".ml": "ocaml", ".swift": "swift", ".dart": "dart",
    ".sh": "shell", ".bash": "shell", ".zsh": "shell", ".ps1": "powershell", ".sql": "sql",
    ".html": "html", ".htm": "html", ".xml": "xml", ".css": "css", ".scss": "css", ".json": "json",
    ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".ipynb": "jupyter",
}
_FILENAMES = {"makefile": "makefile", "dockerfile": "dockerfile", "cmakelists.txt": "cmake"}
# Markup and plain text: documents, not code, whatever they quote.
_NOT_CODE = frozenset({".md", ".markdown", ".rst", ".txt", ".text", ".tex", ".adoc", ".org", ".csv", ".tsv"})

_SHEBANG = re.compile(r"#!\s*\S*?(?:/env\s+(?:-\S+\s+)*)?/?(\w+?)[\d.]*(?:\s|$)")
_SHEBANG_LANGUAGES = {"sh": "shell", "bash": "shell", "zsh": "shell", "dash": "shell", "ksh": "shell",
                      "python": "python", "node": "javascript", "ruby": "ruby", "perl": "perl", "php": "php"}

_CODE_LINE = re.compile("|".join([
    r"^\s*#\s*(?:include|define|ifn?def|endif|pragma|import)\b",  # preprocessor
    r"^\s*(?:package|import|using|namespace|module)\s+[\w.*:]+\s*[;{]?\s*$",
    r"^\s*from\s+[\w.]+\s+import\s",
    r"^\s*(?:def|fn|func|function|class|struct|enum|interface|trait|impl)\s+\w+\s*[(<{:]",
    r"^\s*(?:(?:public|private|protected|static|final|const|let|var|val|export)\s+)+[\w<>\[\]]+",
    r"^\s*(?:if|elif|else|for|while|try|except|finally|with|async\s+def)\b.*:\s*$",  # Python blocks
    r"^\s+(?:return|raise|yield|pass|break|continue|throw)\b",  # indented: prose lines rarely are
    r"^\s*@\w[\w.]*(?:\(.*\))?\s*$",  # decorators, annotations
    r"^\s*[A-Za-z_$][\w.$\[\]'\"]*\s*(?:[-+*/%|&^]|<<|>>|\*\*|//)?=(?!=)\s*\S",  # assignment
    r"^\s*[A-Za-z_$][\w.$]*\(.*\)\s*[;,]?\s*$",  # call
    r"^(?=.*[=(){}\[\]]).*[;{]\s*$",  # statement or block opener of a C-like language (lookahead: linear)
    r"^\s*[)\]}]+[;,)]*\s*$",  # closing brackets
    r"^\s*(?://|/\*|\*/|\*\s|<!--)",  # C-style and markup comments
    # Markup: a declaration, a closing tag, a tag with attributes or an HTML tag ("<unk>" is none).
    r"^\s*(?:<(?:!DOCTYPE|!--|\?xml)|</[A-Za-z][\w:.-]*\s*>|<[A-Za-z][\w:.-]*\s+[\w:.-]+\s*=|"
    r"<(?:html|head|body|div|span|p|a|ul|ol|li|table|tr|td|th|br|hr|img|script|style|link|meta|title|"
    r"h[1-6]|form|input|button|section|header|footer|nav|svg|pre|code)\b[^>\n]*>)",
    r"^\s*(?:then|fi|do|done|esac)\s*$|^\s*(?:if|while)\s+\[",  # shell
    r"^\s*(?:SELECT|INSERT\s+INTO|UPDATE|DELETE\s+FROM|CREATE\s+TABLE|WHERE|FROM|JOIN|GROUP\s+BY|ORDER\s+BY)\b",
    r'^\s*"[^"\n]*"\s*:\s*\S',  # JSON member
    r"^\s*[a-z-]+\s*:\s*[^;{}\n]+;\s*$",  # CSS property
]).replace(r"\s", r"[ \t]"), re.MULTILINE)  # one match per line at most: no pattern crosses a line end

_MARKERS = {  # a language's score is how many times its markers occur in the sample
    "python": r"^\s*def \w+\(.*\)\s*(?:->.*)?:\s*$|^\s*(?:import \w|from [\w.]+ import )|\bself\.|^\s*elif\b|"
              r"^\s*except\b|\bprint\(|^\s*@\w|\bNone\b|\bTrue\b|\bFalse\b|__\w+__|\*\*\w+|"
              r"^\s*(?:class \w+|if|elif|else|for|while|with|try)\b[^;{}\n]*:[ \t]*$",
    "c": r"#include\s*<\w+\.h>|\bprintf\(|\bmalloc\(|\bsizeof\(|\bint main\(|\bNULL\b|\bstruct \w+\s*[{*]",
    "cpp": r"#include\s*<(?:iostream|vector|string|map|memory|algorithm|cstdio)>|\bstd::|\bcout\b|"
           r"\btemplate\s*<|\bnamespace \w+|\bnullptr\b",
    "java": r"\b(?:public|private|protected) (?:static )?(?:final )?(?:class|void|int|String|boolean)\b|"
            r"System\.out\.print|^import java\.|@Override",
    "csharp": r"^using System|Console\.Write|\bnamespace \w+\s*$",
    "javascript": r"\bfunction\b\s*\w*\s*\(|\b(?:const|let|var) \w+ = |=>|console\.log|\brequire\(|"
                  r"module\.exports|^export |\bdocument\.",
    "typescript": r":\s*(?:string|number|boolean|void|any)\b|^\s*(?:export )?interface \w+|<\w+>\(",
    "go": r"^package \w+|\bfunc \w*\(|:=|\bfmt\.",
    "rust": r"\bfn \w+\s*[<(]|\blet mut\b|\w+!\(|^\s*impl\b|^use \w+::|&mut\b",
    "ruby": r"^\s*end\s*$|^\s*require ['\"]|\bputs\b|\.each do\b",
    "php": r"<\?php|\$\w+\s*=|\becho \$",
    "shell": r"^\s*(?:fi|done|esac|then)\s*$|\$\{?[A-Za-z_]\w*\}?|^\s*(?:export|sudo|apt-get|echo) |&&|2>&1",
    "sql": r"^\s*(?:SELECT|INSERT INTO|CREATE TABLE|UPDATE|DELETE FROM)\b|\bWHERE\b|\bFROM\b|\bJOIN\b",
    "html": r"<!DOCTYPE html|<(?:html|head|body|div|span|p|a|ul|li|table|script|style)\b[^>]*>",
    "css": r"^\s*[\w.#:> \t,-]+\{\s*$|^\s*[\w-]+\s*:\s*[^;{}\n]+;\s*$",
}
_MARKER_RES = {lang: re.compile(rx.replace(r"\s", r"[ \t]"), re.MULTILINE) for lang, rx in _MARKERS.items()}
_TRIPLE_QUOTED = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'')
_HASH_COMMENT = re.compile(r"^[ \t]*#(?![ \t]*(?:include|define|ifn?def|endif|pragma|import)\b|!)", re.MULTILINE)
_LETTER = re.compile(r"[^\W\d_]")


@functools.cache
def _identifier() -> py3langid.langid.LanguageIdentifier:
    # Loaded once per process (about a second), on first use rather than at import.
    return py3langid.langid.LanguageIdentifier.from_model_file(py3langid.langid.MODEL_FILE, norm_probs=True)


def language(text: str, max_chars: int = LANGID_CHARS) -> tuple[str, float]:
    """(language code, probability) of text's first max_chars characters; ("und", 0.0) without letters."""
    sample = text[:max_chars]
    if not _LETTER.search(sample):
        return "und", 0.0
    code, probability = _identifier().classify(sample)
    return code, float(probability)


def _by_path(path: str) -> str | None:
    """The language a path names, "" for a known non-code file, None when the path does not tell."""
    name = os.path.basename(path).lower()
    if name in _FILENAMES:
        return _FILENAMES[name]
    ext = os.path.splitext(name)[1]
    if ext in _NOT_CODE:
        return ""
    return _EXTENSIONS.get(ext)


def code_language(text: str, path: str = "") -> str | None:
    """The programming language of text ("python", "c", ..., "other"), or None for natural language.

    path (optional) is the document's file: a known extension decides alone (see the module
    docstring for the content heuristics used otherwise).
    """
    if path:
        known = _by_path(path)
        if known is not None:
            return known or None
    sample = text[:CODE_SAMPLE_CHARS].lstrip()
    if sample.startswith("#!"):
        m = _SHEBANG.match(sample)
        if m and m.group(1) in _SHEBANG_LANGUAGES:
            return _SHEBANG_LANGUAGES[m.group(1)]
    if not sample:
        return None
    # Docstrings, "#" comment lines and Markdown headings count neither way.
    code = _TRIPLE_QUOTED.sub('""', sample)
    lines = sum(1 for line in code.splitlines() if line.strip()) - len(_HASH_COMMENT.findall(code))
    code_lines = len(_CODE_LINE.findall(code))
    if code_lines < _MIN_CODE_LINES or code_lines < _MIN_CODE_LINE_FRACTION * lines:
        return None
    if sample[0] in "{[" and _is_json(text):
        return "json"
    scores = {lang: len(rx.findall(code)) for lang, rx in _MARKER_RES.items()}
    best = max(scores, key=scores.get)  # ties: the first in _MARKERS
    return best if scores[best] else "other"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def is_code(text: str, path: str = "") -> bool:
    """Whether code_language recognises text as code."""
    return code_language(text, path) is not None
