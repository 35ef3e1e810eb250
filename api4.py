import hf_koopman, torch
from transformers import LlamaConfig, LlamaForCausalLM, GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000))
s = hf_koopman.suggest_max_lr(m, num_samples=1024, progress=False)
print(s.describe()); print(s.out_of_range, [i.to_dict() for i in s.outside])
