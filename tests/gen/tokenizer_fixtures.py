"""Tokenizer and chat-template fixtures from llama.cpp (through llama-cpp-python) and jinja2.

What: for two real vocabularies, SmolLM2-135M-Instruct (byte-level BPE, tokenizer.ggml.model =
gpt2, pre = smollm) and Gemma 3 270M (SentencePiece, tokenizer.ggml.model = llama), this
tokenizes a few hundred varied strings with llama.cpp and records

  - ids for every string with (add_special, parse_special) = (False, False), (True, False)
    and (False, True) -- the last is where special-token text in the string becomes the
    special token;
  - llama.cpp's detokenization of the first and the last (llama_detokenize with
    remove_special = False and unparse_special = False / True), as UTF-8 text or hex bytes;
  - the vocabulary facts llama.cpp derives from the metadata: size, bos, eos, eot, the
    end-of-generation set (llama_vocab_is_eog over every id), add_bos / add_eos, each
    token's attribute bits (as a sha256 plus the ids whose attributes are not NORMAL), and
    every token's piece (llama_token_to_piece, special false and true) as a sha256 plus a
    sample.

For the other byte-level pre-tokenizers sparrow supports (llama3 = llama-bpe, qwen2, default,
gpt-2), there is no small model at hand, so SmolLM2's vocabulary stands in: its metadata
(no tensors) is written to a temporary GGUF with `tokenizer.ggml.pre` replaced, and llama.cpp
tokenizes every string with it (smollm2_pre.json); the test swaps the same key.

It also renders chat templates with jinja2 the way Hugging Face transformers does
(llama_cpp.llama_chat_format.Jinja2ChatFormatter: trim_blocks, lstrip_blocks, loopcontrols,
raise_exception, HF's tojson) and, where transformers is installed, checks that
transformers' own renderer gives the same text: SmolLM2's template read from its GGUF, and
Gemma 3's published template (the Gemma 3 GGUF used here carries none), for a few
conversations.

Output: tests/fixtures/tokenizer/{smollm2,gemma3,smollm2_pre,chat_templates}.json. The model files are
not committed; fetch them with `eval "$(bash tests/fetch_models.sh)"`.

How to run (needs llama-cpp-python, jinja2; transformers optional for the cross-check):

    eval "$(bash tests/fetch_models.sh)"
    python3 tests/gen/tokenizer_fixtures.py

Reference versions used for the committed fixtures: llama-cpp-python 0.3.36 (its vendored
llama.cpp), Jinja2 3.1.6, transformers 5.24.0.
"""

import ctypes
import hashlib
import json
import os
import sys
from pathlib import Path

import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "fixtures" / "tokenizer"

# llama_token_attr bits (llama.h)
ATTR_NORMAL = 1 << 2


def test_strings():
    """The strings to tokenize: hand-picked cases, then systematic runs."""
    s = [
        # empty and whitespace
        "", " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", "\n\n\n", " \n", "\n ", "\t\t",
        " \t \n ", "    four spaces", "trailing space ", "trailing spaces   ", " leading",
        "   leading three", "\tleading tab", "a\tb", "a \tb", "a\t\tb", "a  b", "a   b",
        "a\n\nb", "a\r\nb\r\n", "line1\nline2\nline3", "\n\n\nstart after newlines",
        "end with newline\n", "mixed \t\n\r\n whitespace \u00a0 nbsp", "\u3000ideographic space",
        "em\u2003space and thin\u2009space", "zero\u200bwidth\u200bspace", "\u00a0",
        # plain English, punctuation, case
        "Hello", "Hello world", "hello world", "HELLO WORLD", "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "What's up? I'm fine, you're late, they've gone, we'll see, he'd know, it's 'quoted'.",
        "WHAT'S UP? I'M FINE, YOU'RE LATE, THEY'VE GONE, WE'LL SEE, HE'D KNOW",
        "don't DON'T Don'T can't won't isn't", "'s 't 're 've 'm 'll 'd", "'S 'T 'RE 'VE 'M 'LL 'D",
        "'LL 'Ll 'lL", "rock 'n' roll", "the dogs' bones", "' '' ''' '", "O'Reilly's book",
        "Mr. Smith went to Washington... Really?!", "Wait -- what? (yes) [no] {maybe}",
        "semi;colon:colon,comma.period!bang?question", "a.b.c.d", "e.g. i.e. etc.",
        "#hashtag @mention $dollar %percent ^caret &amp *star", "~tilde `backtick` |pipe|",
        "\"double quotes\" and 'single quotes'", "\u201csmart quotes\u201d \u2018single\u2019",
        "ellipsis\u2026 em\u2014dash en\u2013dash", "!!!???...", "----------", "==========",
        "__init__ __main__", "snake_case_name camelCaseName PascalCaseName kebab-case-name",
        "ALLCAPS lowercase MiXeD", "a", "I", "A B C D E F G", "abcdefghijklmnopqrstuvwxyz",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "supercalifragilisticexpialidocious",
        "pneumonoultramicroscopicsilicovolcanoconiosis",
        # digits and numbers
        "0", "1", "12", "123", "1234", "12345", "123456", "1234567", "3.14159", "-42", "+7",
        "1,000,000", "1.000.000,50", "2024-01-15", "12:34:56", "0xDEADBEEF", "0b1010", "1e-10",
        "6.022e23", "3/4", "100%", "$19.99", "\u20ac5,00", "\u00a310", "\u00a5500",
        "9876543210987654321098765432109876543210",
        "Phone: +1 (555) 123-4567", "v1.2.3-beta.4", "IPv4 192.168.0.1", "room 101b",
        "\u0661\u0662\u0663 arabic-indic digits", "\u0967\u0968\u0969 devanagari digits",
        "\u2460\u2461\u2462 circled", "\u00bd \u00bc \u00be fractions", "\u2163 roman numeral",
        "\uff11\uff12\uff13 fullwidth digits", "x\u00b2 + y\u00b3 = z\u2074",
        # scripts
        "Bonjour, comment \u00e7a va ? \u00c0 bient\u00f4t !", "Stra\u00dfe \u00fcber \u00e4hnlich \u00d6l",
        "\u00bfD\u00f3nde est\u00e1 la biblioteca? \u00a1Ol\u00e9!", "Cz\u0119\u015b\u0107, jak si\u0119 masz?",
        "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u041a\u0430\u043a \u0434\u0435\u043b\u0430?",
        "\u0417\u0434\u0440\u0430\u0432\u0435\u0439, \u0441\u0432\u044f\u0442!",
        "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5",
        "\u4f60\u597d\uff0c\u4e16\u754c\uff01", "\u6211\u7231\u5317\u4eac\u5929\u5b89\u95e8\u3002",
        "\u4eca\u65e5\u306f\u3044\u3044\u5929\u6c17\u3067\u3059\u306d\u3002",
        "\u30ab\u30bf\u30ab\u30ca\u3068\u3072\u3089\u304c\u306a", "\uff8a\uff9d\uff76\uff78\uff76\uff85 halfwidth",
        "\uc548\ub155\ud558\uc138\uc694, \uc138\uacc4!", "\u1100\u1161\u11a8 jamo",
        "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
        "\u0627\u0644\u0633\u0644\u0627\u0645 \u0639\u0644\u064a\u0643\u0645 123 mixed RTL",
        "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd", "\u05e2\u05b4\u05d1\u05b0\u05e8\u05b4\u05d9\u05ea with niqqud",
        "\u0646\u0633\u062a\u0639\u0644\u06cc\u0642 \u0641\u0627\u0631\u0633\u06cc",
        "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
        "\u0bb5\u0ba3\u0b95\u0bcd\u0b95\u0bae\u0bcd \u0b89\u0bb2\u0b95\u0bae\u0bcd",
        "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01",
        "\u10d2\u10d0\u10db\u10d0\u10e0\u10ef\u10dd\u10d1\u10d0", "\u0532\u0561\u0580\u0565\u0582",
        "\u12e8\u12a0\u121b\u122d\u129b", "\u1780\u1798\u17d2\u1796\u17bb\u1787\u17b6",
        "\u0dc3\u0dd2\u0d82\u0dc4\u0dbd", "Ti\u1ebfng Vi\u1ec7t c\u00f3 d\u1ea5u",
        "T\u00fcrk\u00e7e \u0131\u0130 \u015f\u015e \u011f\u011e", "\u00cdslenska \u00fe\u00f0 \u00e6\u00f6",
        "\u13e3\u13b3\u13a9 Cherokee", "\U00010330\U00010331 gothic",
        # combining marks and normalization
        "e\u0301 vs \u00e9", "n\u0303o\u0308", "a\u0300\u0301\u0302\u0303\u0304 stacked",
        "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dalgo",
        "\u1100\u1161 decomposed hangul", "\ufb01 ligature \ufb02", "\u212b angstrom \u00c5",
        "\u0041\u030a vs \u00c5", "caf\u00e9 cafe\u0301",
        # emoji
        "\U0001f600", "\U0001f600\U0001f601\U0001f602", "I \u2764\ufe0f you", "\u2764",
        "\U0001f44d\U0001f3fb\U0001f44d\U0001f3fc\U0001f44d\U0001f3fd\U0001f44d\U0001f3fe\U0001f44d\U0001f3ff",
        "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 family",
        "\U0001f469\U0001f3fd\u200d\U0001f4bb coder", "\U0001f3f3\ufe0f\u200d\U0001f308 flag",
        "\U0001f1fa\U0001f1f8\U0001f1ef\U0001f1f5\U0001f1e9\U0001f1ea flags", "#\ufe0f\u20e3 keycap",
        "\U0001f9d1\u200d\U0001f91d\u200d\U0001f9d1", "text\U0001f680rocket", "\U0001fae0 new emoji",
        ":) :-( ;-) <3 ^_^ \u00af\\_(\u30c4)_/\u00af",
        # symbols and math
        "\u2200x \u2208 \u211d: x\u00b2 \u2265 0", "\u2211_{i=1}^{n} i = n(n+1)/2", "\u221a2 \u2248 1.414",
        "\u03b1 \u03b2 \u03b3 \u03b4 \u03c0 \u03a9", "\u2190 \u2192 \u2191 \u2193 \u21d2 \u21d4",
        "\u00a9 \u00ae \u2122 \u00a7 \u00b6 \u2020 \u2021", "\u2603 \u2600 \u2601 \u2602", "\u2500\u2502\u250c\u2510\u2514\u2518 box",
        "\u2588\u2593\u2592\u2591", "\u00b0C \u00b0F \u00b5m \u2126",
        # code
        "def foo(x):\n    return x * 2\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "fn main() {\n    println!(\"Hello, {}!\", name);\n}",
        "const f = async (a, b) => { await g(a ?? b); };",
        "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
        "<html><body><div class=\"x\">Hi</div></body></html>",
        "<table><tr><td>1</td><td>2</td></tr></table>",
        "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
        "#include <stdio.h>\nint main(void) { return 0; }",
        "if x == 1:\n\tpass\nelif x != 2:\n\t\tpass",
        "    indented\n        more\n            most",
        "$ ls -la | grep foo > out.txt 2>&1 && echo done",
        "x <<= 2; y >>= 3; z **= 4; a //= 5; b ||= c; d &&= e;",
        "public static void main(String[] args) { System.out.println(\"hi\"); }",
        "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"go\") }",
        "matrix = [[1, 2], [3, 4]]\nprint(matrix[0][1])",
        "-- lua comment\nlocal t = {}\nfor k, v in pairs(t) do print(k, v) end",
        "\\begin{equation} E = mc^2 \\end{equation}", "C:\\Users\\name\\file.txt",
        "/usr/local/bin/python3", "~/.config/app/settings.json",
        "```python\nprint('hi')\n```", "| a | b |\n|---|---|\n| 1 | 2 |",
        "# Heading\n\n* item one\n* item two\n\n> quote", "<!-- comment --> <?xml version=\"1.0\"?>",
        # URLs and mixed
        "https://example.com/path?query=1&other=two#frag", "http://localhost:8080/api/v1/users/42",
        "mailto:someone@example.org", "user.name+tag@sub.example.co.uk",
        "www.example.com/\u00fcber/\u65e5\u672c", "ftp://files.example.net/pub/file.tar.gz",
        "Visit https://ex.com, or email a@b.c!", "The price is $5 (about \u20ac4.60) \u2014 cheap\U0001f60a",
        "Mixed \u4e2d\u6587 and English and \u0440\u0443\u0441\u0441\u043a\u0438\u0439 and \u0627\u0644\u0639\u0631\u0628\u064a\u0629 123",
        "CamelCase123Numbers456", "abc123def456", "1st 2nd 3rd 4th", "H2O CO2 C6H12O6",
        "ALL-CAPS-WITH-DASHES_and_underscores", "a\u00adb soft hyphen", "tab\tseparated\tvalues",
        "comma,separated,values\n1,2,3", "control\x01\x02\x7f chars", "bell\x07 and escape\x1b[0m",
        "null\x00byte",
        # special-token text, in both vocabularies' spellings
        "<|im_start|>", "<|im_end|>", "<|endoftext|>",
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
        "text before<|im_end|>text after", "<|im_end|><|im_end|>", "<|im_end|> <|im_start|>",
        "<|im_start", "im_start|>", "<|im_start|", "<<|im_end|>>", "<|endoftext|>The end",
        "<repo_name>sparrow<file_sep>src/main.rs", "<reponame> <filename> <gh_stars>",
        "<jupyter_code>print(1)<jupyter_output>1", "<issue_start>bug<issue_closed>",
        "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>",
        "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>",
        "</s>", "<s>", "<s>hello</s>", "[multimodal]", "<unused0>", "<unused99>",
        "<start_of_image><end_of_image>", "x<eos>y", " <end_of_turn> ", "<end_of_turn><eos>",
        "<b>bold</b> <i>italic</i> <code>x</code>", "<h1>Title</h1>\n<p>para</p>",
        "<start_of_turn", "end_of_turn>", "<<start_of_turn>>",
        "<|im_start|>user\n<start_of_turn>mixed<end_of_turn><|im_end|>",
    ]
    # systematic runs: whitespace and newline lengths, digit lengths, repeats
    for n in (1, 2, 3, 4, 5, 8, 16, 33):
        s.append("x" + " " * n + "y")
    for n in (2, 4, 7, 31, 32, 40):
        s.append("x" + "\n" * n + "y")
    for n in (3, 8, 30):
        s.append("\t" * n + "z")
    for n in (1, 2, 3, 4, 5, 6, 7, 10, 13, 20):
        s.append("".join(str((i * 7 + 3) % 10) for i in range(n)))
    for w in ("a", "ab", "the ", "\u00e9", "\u4e2d", "\U0001f600", "- "):
        s.append(w * 25)
    s.append(" ".join(["word"] * 60))
    s.append("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
             "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
             "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat.")
    seen = set()
    out = []
    for x in s:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def vocab_of(llm):
    return llama_cpp.llama_model_get_vocab(llm.model)


def tokenize(llm, text, add_special, parse_special):
    return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)


def detokenize(vocab, ids, remove_special, unparse_special):
    """llama_detokenize, growing the buffer when llama.cpp asks for more."""
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 16 * len(ids)
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special, unparse_special)
        if n >= 0:
            return buf.raw[:n]
        size = -n + 1


def piece(vocab, tok, special):
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, tok, buf, size, 0, special)
        if n >= 0:
            return buf.raw[:n]
        size = -n + 1


def text_or_hex(b):
    """Bytes as a JSON string when they are UTF-8, else as {"hex": "..."}."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": b.hex()}


def attr_runs(vocab, n):
    """[first, last + 1, attr] for each run of equal attributes other than NORMAL."""
    runs = []
    for t in range(n):
        a = int(llama_cpp.llama_vocab_get_attr(vocab, t))
        if a == ATTR_NORMAL:
            continue
        if runs and runs[-1][1] == t and runs[-1][2] == a:
            runs[-1][1] = t + 1
        else:
            runs.append([t, t + 1, a])
    return runs


def pieces_digest(vocab, n, special):
    """sha256 over every token's piece, each as u32 little-endian length then bytes."""
    h = hashlib.sha256()
    for t in range(n):
        p = piece(vocab, t, special)
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    return h.hexdigest()


def attrs_digest(vocab, n):
    h = hashlib.sha256()
    for t in range(n):
        h.update(int(llama_cpp.llama_vocab_get_attr(vocab, t)).to_bytes(4, "little"))
    return h.hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def vocab_fixture(name, env, path, strings):
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    v = vocab_of(llm)
    n = llama_cpp.llama_vocab_n_tokens(v)
    null = -1
    info = {
        "n_tokens": n,
        "bos": llama_cpp.llama_vocab_bos(v),
        "eos": llama_cpp.llama_vocab_eos(v),
        "eot": llama_cpp.llama_vocab_eot(v),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(v)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(v)),
        "eog": [t for t in range(n) if llama_cpp.llama_vocab_is_eog(v, t)],
        "attrs_sha256": attrs_digest(v, n),
        "not_normal_attrs": attr_runs(v, n),
        "pieces_sha256": pieces_digest(v, n, False),
        "pieces_special_sha256": pieces_digest(v, n, True),
    }
    for k in ("bos", "eos", "eot"):
        if info[k] == null:
            info[k] = None
    # a sample of pieces: the first 300 ids, then about 500 spread over the rest
    sample = sorted(set(range(min(n, 300))) | set(range(0, n, max(97, n // 500))))
    info["piece_samples"] = [
        [t, text_or_hex(piece(v, t, False)), text_or_hex(piece(v, t, True))] for t in sample
    ]

    cases = []
    for text in strings:
        ids = tokenize(llm, text, False, False)
        case = {
            "text": text,
            "ids": ids,
            "ids_add_special": tokenize(llm, text, True, False),
            "ids_parse_special": tokenize(llm, text, False, True),
            "detok": text_or_hex(detokenize(v, ids, False, False)),
        }
        case["detok_parse_special_unparse"] = text_or_hex(
            detokenize(v, case["ids_parse_special"], False, True))
        cases.append(case)
    return {
        "generator": "tests/gen/tokenizer_fixtures.py",
        "reference": f"llama-cpp-python {llama_cpp.__version__} (vendored llama.cpp)",
        "model_env": env,
        "model_file": path.name,
        "model_sha256": sha256_file(path),
        "vocab": info,
        "cases": cases,
    }


OTHER_PRE = ["llama-bpe", "qwen2", "default", "gpt-2"]


def pre_fixture(smollm_path, strings):
    """llama.cpp's ids for every string with SmolLM2's vocabulary under other pre-tokenizers."""
    import tempfile

    import gguf

    r = gguf.GGUFReader(str(smollm_path))
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for pre in OTHER_PRE:
            path = Path(d) / f"smollm2-{pre}.gguf"
            w = gguf.GGUFWriter(str(path), arch=r.fields["general.architecture"].contents())
            for name, f in r.fields.items():
                if name.startswith("GGUF.") or name == "general.architecture":
                    continue
                value = pre if name == "tokenizer.ggml.pre" else f.contents()
                vtype = f.types[0]
                sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(name, value, vtype, sub_type=sub)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
            out[pre] = [tokenize(llm, t, False, False) for t in strings]
            del llm
    return {
        "generator": "tests/gen/tokenizer_fixtures.py",
        "reference": f"llama-cpp-python {llama_cpp.__version__} (vendored llama.cpp)",
        "model_env": "SPARROW_SMOLLM2_Q4_1",
        "model_sha256": sha256_file(smollm_path),
        "note": "SmolLM2's vocabulary with tokenizer.ggml.pre replaced; ids with add_special and parse_special false",
        "strings": strings,
        "ids": out,
    }


GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# A template that exercises the Python string methods HF templates call on strings and
# dicts (.strip(), .startswith(), .split(), .items(), ...) and the loop controls.
PYCOMPAT_TEMPLATE = """{%- for message in messages -%}
{%- set c = message['content'] -%}
[{{ message['role'].upper() }}|{{ c.strip() }}|{{ c.lstrip() }}|{{ c.rstrip() }}|{{ c.strip(' !') }}
|{{ c.startswith('  He') }}|{{ c.endswith('! ') }}|{{ c.split() | join(',') }}|{{ c.split('l') | join('/') }}
|{{ c.replace('l', 'L') }}|{{ c.lower() }}|{{ c.title() }}|{{ c.capitalize() }}|{{ c.count('l') }}|{{ c.find('o') }}
|{{ c.strip().rsplit(' ', 1) | join('#') }}|{{ c.split(' ', 1) | join('#') }}|{{ c.isdigit() }}|{{ c.strip().isalpha() }}]
{%- if loop.index0 == 1 %}{% continue %}{% endif %}
{%- for k, v in message.items() %}<{{ k }}={{ v | length }}>{% endfor %}
{{- message.get('missing', 'dflt') }}{{ message.get('role') }}
{%- if loop.index0 == 2 %}{% break %}{% endif %}
{%- endfor %}
{{ bos_token }}{{ eos_token }}{% if add_generation_prompt %}GEN{% endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  What is 2+2?  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\nMake it short."}],
    [{"role": "system", "content": "Sys\n"}, {"role": "user", "content": "\u00e9t\u00e9 \U0001f600 <b>x</b>"},
     {"role": "assistant", "content": " ok "}, {"role": "user", "content": "again"}],
]


def render_reference(template, messages, add_generation_prompt, bos, eos):
    """jinja2 through llama-cpp-python's HF-compatible formatter; the raw prompt text."""
    fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                              add_generation_prompt=add_generation_prompt)
    return fmt(messages=messages).prompt


def render_transformers(template, messages, add_generation_prompt, bos, eos):
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except Exception:
        return None
    out, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                   add_generation_prompt=add_generation_prompt,
                                   bos_token=bos, eos_token=eos)
    return out[0]


def template_error(template, messages, bos, eos):
    try:
        render_reference(template, messages, True, bos, eos)
    except Exception as e:  # jinja2 raises what raise_exception was given
        return str(e)
    return None


def chat_fixture(smollm_path):
    from gguf import GGUFReader

    r = GGUFReader(str(smollm_path))
    smol_template = r.fields["tokenizer.chat_template"].contents()
    templates = [
        ("smollm2", smol_template, "<|im_start|>", "<|im_end|>"),
        ("gemma3", GEMMA3_TEMPLATE, "<bos>", "<eos>"),
        ("pycompat", PYCOMPAT_TEMPLATE, "<s>", "</s>"),
    ]
    out = []
    for name, tpl, bos, eos in templates:
        renders = []
        for conv in CONVERSATIONS:
            for agp in (False, True):
                try:
                    text = render_reference(tpl, conv, agp, bos, eos)
                except Exception as e:
                    renders.append({"messages": conv, "add_generation_prompt": agp, "error": str(e)})
                    continue
                hf = render_transformers(tpl, conv, agp, bos, eos)
                if hf is not None and hf != text:
                    sys.exit(f"{name}: transformers and Jinja2ChatFormatter disagree:\n{hf!r}\n{text!r}")
                renders.append({"messages": conv, "add_generation_prompt": agp, "text": text})
        out.append({"name": name, "template": tpl, "bos_token": bos, "eos_token": eos,
                    "renders": renders})
    # raise_exception: Gemma 3 refuses a conversation whose roles do not alternate
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    err = template_error(GEMMA3_TEMPLATE, bad, "<bos>", "<eos>")
    assert err and "alternate" in err, err
    return {
        "generator": "tests/gen/tokenizer_fixtures.py",
        "reference": "jinja2 via llama_cpp.llama_chat_format.Jinja2ChatFormatter, checked against "
                     "transformers.utils.chat_template_utils.render_jinja_template",
        "templates": out,
        "errors": [{"template": "gemma3", "messages": bad, "message": err}],
    }


def model_path(var):
    p = os.environ.get(var)
    if not p or not Path(p).is_file():
        sys.exit(f"{var} is not set or missing; run: eval \"$(bash tests/fetch_models.sh)\"")
    return Path(p)


def dump(path, obj):
    """JSON with each element of a top-level or `vocab` list on its own line: compact and
    diffable."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def one(x):
        return json.dumps(x, ensure_ascii=False)

    def block(d, indent):
        pad = " " * indent
        lines = []
        for k, v in d.items():
            if isinstance(v, dict):
                lines.append(f"{pad}{one(k)}: {{\n{block(v, indent + 1)}\n{pad}}}")
            elif isinstance(v, list) and v and isinstance(v[0], (list, dict)):
                items = ",\n".join(pad + " " + one(x) for x in v)
                lines.append(f"{pad}{one(k)}: [\n{items}\n{pad}]")
            else:
                lines.append(f"{pad}{one(k)}: {one(v)}")
        return ",\n".join(lines)

    path.write_text("{\n" + block(obj, 1) + "\n}\n", encoding="utf-8")


def main():
    strings = test_strings()
    print(f"{len(strings)} strings", file=sys.stderr)
    for name, env in (("smollm2", "SPARROW_SMOLLM2_Q4_1"), ("gemma3", "SPARROW_GEMMA3")):
        fx = vocab_fixture(name, env, model_path(env), strings)
        dump(OUT / f"{name}.json", fx)
        print(f"wrote {OUT / (name + '.json')}", file=sys.stderr)
    dump(OUT / "smollm2_pre.json", pre_fixture(model_path("SPARROW_SMOLLM2_Q4_1"), strings))
    print(f"wrote {OUT / 'smollm2_pre.json'}", file=sys.stderr)
    dump(OUT / "chat_templates.json", chat_fixture(model_path("SPARROW_SMOLLM2_Q4_1")))
    print(f"wrote {OUT / 'chat_templates.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
