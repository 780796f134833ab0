"""FlexFlow Serve's quick-start (its README's "Quickstart": speculative inference with one SSM),
run on flockctl's engine: only the import line differs.

FlexFlow's script names hub models; with nothing to download, set FLOCKCTL_LLM and FLOCKCTL_SSM to
local model directories (or leave them unset on a machine that can reach the hub):

    FLOCKCTL_LLM=./my-llama FLOCKCTL_SSM=./my-draft python examples/flexflow_quickstart.py
"""

import os

import flockctl.engine.llm as ff

ff.init(
        num_gpus=4,
        memory_per_gpu=14000,
        zero_copy_memory_per_node=30000,
        tensor_parallelism_degree=4,
        pipeline_parallelism_degree=1
    )

# Specify the LLM
llm = ff.LLM(os.environ.get("FLOCKCTL_LLM", "meta-llama/Llama-2-7b-hf"))

# Specify a list of SSMs (just one in this case)
ssms=[]
ssm = ff.SSM(os.environ.get("FLOCKCTL_SSM", "JackFram/llama-68m"))
ssms.append(ssm)

# Create the sampling configs
generation_config = ff.GenerationConfig(
    do_sample=False, temperature=0.9, topp=0.8, topk=1
)

# Compile the SSMs for inference and load the weights into memory
for ssm in ssms:
    ssm.compile(generation_config)

# Compile the LLM for inference and load the weights into memory
llm.compile(generation_config,
            max_requests_per_batch = 16,
            max_seq_length = 256,
            max_tokens_per_batch = 128,
            ssms=ssms)

llm.start_server()
result = llm.generate("Here are some travel tips for Tokyo:\n")
llm.stop_server() # This invocation is optional
