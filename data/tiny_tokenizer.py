"""A tiny byte-level BPE tokenizer with Qwen-style special tokens, built locally for tests and demos.

`build_tiny_tokenizer(out_dir)` trains a BPE model with the `tokenizers` library on a small
built-in corpus (code, chat and tool-call text), and saves it with transformers together
with a chat template in the Qwen3-Coder spirit:

    <|im_start|>system\\n...<|im_end|>\\n          tools are listed in the system turn
    <|im_start|>user\\n...<|im_end|>\\n
    <|im_start|>assistant\\nCONTENT
    <tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call><|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\nRESULT\\n</tool_response><|im_end|>\\n   consecutive tool messages share one turn

The same files come out of every run (training is deterministic and the corpus is fixed).
"""
from __future__ import annotations

import random
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from megalora.data.demo_data import demo_conversations

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen marks these as added but not special: they survive decoding with skip_special_tokens.
MARKUP_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
VOCAB_SIZE = 1536

# Qwen2-style pre-tokenisation: letters with one leading non-letter, single digits, punctuation runs
# with trailing newlines, newline runs, other whitespace.
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = r"""{%- macro render_value(v) -%}
{%- if v is string -%}{{- v -}}{%- else -%}{{- v | tojson -}}{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0].role == 'system' -%}
{%- set system_text = messages[0].content -%}
{%- set rest = messages[1:] -%}
{%- else -%}
{%- set system_text = '' -%}
{%- set rest = messages -%}
{%- endif -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if system_text -%}{{- system_text + '\n\n' -}}{%- endif -%}
{{- '# Tools\n\nYou may call these functions:\n<tools>' -}}
{%- for tool in tools -%}
{{- '\n' + ((tool.function if tool.function is defined else tool) | tojson) -}}
{%- endfor -%}
{{- '\n</tools>\n\nTo call a function reply with:\n<tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n</parameter>\n</function>\n</tool_call><|im_end|>\n' -}}
{%- elif messages and messages[0].role == 'system' -%}
{{- '<|im_start|>system\n' + system_text + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in rest -%}
{%- if message.role == 'system' -%}
{{- raise_exception('a system message may only come first') -}}
{%- elif message.role == 'user' -%}
{{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{{- '<|im_start|>assistant\n' -}}
{%- if message.content is string -%}{{- message.content -}}{%- endif -%}
{%- if message.tool_calls -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- if message.content or not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n<function=' + fn.name + '>\n' -}}
{%- if fn.arguments -%}
{%- for arg_name, arg_value in fn.arguments | items -%}
{{- '<parameter=' + arg_name + '>\n' + render_value(arg_value) + '\n</parameter>\n' -}}
{%- endfor -%}
{%- endif -%}
{{- '</function>\n</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' -}}
{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- else -%}
{{- raise_exception('unknown role ' + message.role) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""

_CODE = '''
def add(a, b):
    """Return the sum of a and b."""
    return a + b


def read_lines(path):
    with open(path) as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        self.count += step
        return self.count


for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

import json
data = json.loads('{"name": "value", "items": [1, 2, 3]}')
result = {key: len(str(value)) for key, value in data.items()}
'''

_CHAT = '''
User: How do I reverse a list in Python?
Assistant: Use slicing: items[::-1] returns a reversed copy, or call items.reverse() to reverse in place.
User: Read the file main.py and tell me what it does.
Assistant: The file main.py defines a function that adds two numbers and prints the result.
User: Run the tests please.
Assistant: All tests passed. The function returns the expected values.
User: What is the square of 12?
Assistant: The square of 12 is 144.
'''


_WORDS = """
the a an and or not is are was be to of in on for with as by at from this that these it its you your we our
they can will would should could may must do does did done have has had make makes made use uses used get
set put run runs ran call calls called return returns read reads write writes open close start stop test
tests check fix add remove change update create delete find search list show print load save build install
file files folder path name names line lines code value values key keys item items number numbers string
strings type types class classes function functions method methods module modules package import export
error errors bug bugs issue result results output input data model models config option options default
first last next previous new old small large empty full true false none null zero one two three four five
six seven eight nine ten hundred thousand count total sum size length width height index offset range
loop while break continue if else elif try except finally raise assert lambda yield async await global
self init main args kwargs dict tuple int float bool str bytes json yaml text token tokens batch step
steps train training loss rate learning epoch epochs sample samples shuffle seed random tensor shape
memory disk cache server client request response user users message messages tool tools assistant system
question answer please thanks sure here there what which when where why how who because so then also
only just more most less each every all any some many much very well good better best simple quick
slow fast right left top bottom inside outside before after again always never often sometimes
parser reader writer loader logger handler manager builder runner helper worker scheduler optimizer
""".split()


def _sentences(num: int) -> list[str]:
    rng = random.Random(0)
    out = []
    for _ in range(num):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ","])
        if rng.random() < 0.3:
            sentence = f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}({rng.choice(_WORDS)}={rng.randint(0, 99)})"
        out.append(sentence)
    return out


def _corpus() -> list[str]:
    texts = [_CODE, _CHAT, *_sentences(4000)]
    for conv in demo_conversations(num_samples=300, seed=1234):
        for message in conv["messages"]:
            texts.append(message["content"])
            for call in message.get("tool_calls", []):
                fn = call["function"]
                texts.append(fn["name"] + " " + " ".join(f"{k} {v}" for k, v in fn["arguments"].items()))
    texts.append("<function=read_file>\n<parameter=path>\nmain.py\n</parameter>\n</function>\n")
    texts.append("system user assistant tool tools function parameter description properties required type string")
    return texts


def build_tiny_tokenizer(out_dir: str | Path) -> Path:
    """Train the tiny byte-level BPE tokenizer and save it (with its chat template) to `out_dir`.

    Returns `out_dir` as a Path. Loading it back: `transformers.AutoTokenizer.from_pretrained(out_dir)`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Untrimmed offsets: label masks map character spans of the rendered chat to tokens.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, model_max_length=32768, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return out
