"""The built-in English text the tiny model's tokenizer is trained on.

Built in because nothing can be downloaded where genq's tests run, and fixed because the tokenizer
(and so every token id of the model) must come out the same on every machine.
"""

from __future__ import annotations

# Small built-in corpus: enough distinct English to learn ~250 merges. ASCII only, so every merged
# token decodes to valid UTF-8 on its own.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A job runner takes prompts from a queue and hands them to a
model server, then stores the generated text and reports how long it took. Workers pull jobs, run them,
and acknowledge them when they are done; if a worker dies, the job comes back and another worker runs it.
The weather today is sunny with a light wind from the west. In the morning there was fog over the river,
but by noon the sky had cleared and people walked along the water with their dogs and their children.
She opened the door, looked at the garden, and decided that the roses needed water before the evening.
He wrote a letter to his brother about the new house, the long winter, and the small boat on the lake.
Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in text, as do dates like May 5 and times like 9:30.
Questions are common: What is the capital of France? How many legs does a spider have? Why is the sky
blue? Answers follow: Paris is the capital of France. A spider has eight legs. The sky is blue because
air scatters blue light more than red light. Tell me a story about a cat who learned to read books.
Once upon a time there was a cat who lived in a library. Every night the cat walked between the shelves
and looked at the pages of the books that the people had left open on the tables. One night the cat
read a whole page, and then another, and by the spring it had read every book about fish in the house.
The system prompt says: you are a helpful assistant. The user asks a question and the assistant answers
it in a short and friendly way. Please summarize the following paragraph in one sentence. Translate
this sentence into French. Write a short poem about the sea. Explain how a queue works to a child.
Good software is tested, measured and simple. Errors should be clear, logs should be useful, and every
request should have a timeout. Retry with backoff, but do not retry forever; keep the latency low.
Every morning the baker opens the shop at six, lights the oven, and bakes bread, rolls and small cakes.
The train to the city leaves at seven and arrives at eight; on Sundays there is only one train an hour.
Music, art and science help people understand the world and each other. Learning takes time and care.
"""


def corpus_lines() -> list[str]:
    """Split the corpus into lines; training sees them in a fixed order so the result is reproducible."""
    return [line for line in CORPUS.splitlines() if line.strip()]
