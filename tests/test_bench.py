"""glmchat bench's workload on a tiny checkpoint: the seed's eight prompts, timings that add up."""

from glmchat.bench import bench_prompts, format_table, run_bench
from glmchat.chat import load

# The seed's workload, written out here: the blog's four questions, each in English then Chinese.
SEED_PROMPTS = [
    "What is ChatGLM? What are some similarities and differences between ChatGLM and ChatGPT? .Provide answer in English",
    "什么是ChatGLM？ChatGLM和ChatGPT之间有哪些相似和不同之处？ 请提供答案，并使用中文语言",
    "Explain the recent developments in natural language processing .Provide answer in English",
    "解释自然语言处理领域的最近发展。 请提供答案，并使用中文语言",
    "Implement code for binary search in Python .Provide answer in English",
    "在Python中实现二分查找的代码 请提供答案，并使用中文语言",
    "Summarize the paper 'Attention Is All You Need' .Provide answer in English",
    "总结论文 'Attention Is All You Need' 请提供答案，并使用中文语言",
]


def test_bench_runs_the_seed_workload(tiny_ckpt):
    model = load(str(tiny_ckpt), device="cpu", dtype="float32", progress=False)
    model.random_weights = True  # stop tokens ignored: every prompt generates exactly max_new_tokens
    result = run_bench(model, max_new_tokens=5)
    prompts = [r["prompt"] for r in result["prompts"]]
    assert prompts == bench_prompts() == SEED_PROMPTS
    assert prompts[1].endswith(" 请提供答案，并使用中文语言") and prompts[0].endswith(" .Provide answer in English")
    for r in result["prompts"]:
        assert r["generated_tokens"] == 5
        assert r["prompt_tokens"] == len(model.tokenizer.build_chat_input(r["prompt"], history=[]).input_ids[0])
        assert 0 < r["ttft_s"] <= r["total_s"]
    assert result["total"]["generated_tokens"] == 40
    table = format_table(result)
    assert "total" in table and "peak RSS" in table and "quantization none" in table
