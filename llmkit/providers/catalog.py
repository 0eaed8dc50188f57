"""The provider catalog: data, not code. One row per provider.

Each row names the wire format (which adapter speaks to it), the base URL, how the key
is sent and which environment variable holds it by default. ``[[providers]]`` in the
config overrides any field of a row or adds a new (OpenAI-compatible) provider. Rows
whose base URL depends on the account (Azure, Cloudflare, Databricks ...) have none
here and need ``base_url`` in the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    wire: str
    base_url: str
    key_env: str
    auth: str = "bearer"
    headers: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    key_required: bool = True


def _openai(name: str, base_url: str, key_env: str, *models: str) -> CatalogEntry:
    return CatalogEntry(name, "openai", base_url, key_env, models=models)


def _local(name: str, base_url: str, key_env: str) -> CatalogEntry:
    """A self-hosted OpenAI-compatible server: a key is optional."""
    return CatalogEntry(name, "openai", base_url, key_env, key_required=False)


CATALOG: tuple[CatalogEntry, ...] = (
    # Native wire formats.
    _openai("openai", "https://api.openai.com/v1", "OPENAI_API_KEY", "gpt-4o", "gpt-4o-mini"),
    CatalogEntry("azure", "azure", "", "AZURE_OPENAI_API_KEY", auth="api-key",
                 options={"api_version": "2024-10-21"}),
    CatalogEntry("anthropic", "anthropic", "https://api.anthropic.com/v1", "ANTHROPIC_API_KEY",
                 auth="x-api-key", headers={"anthropic-version": "2023-06-01"},
                 models=("claude-sonnet-4-5", "claude-haiku-4-5")),
    CatalogEntry("gemini", "gemini", "https://generativelanguage.googleapis.com/v1beta",
                 "GEMINI_API_KEY", auth="x-goog-api-key",
                 models=("gemini-2.5-flash", "gemini-2.5-pro")),
    CatalogEntry("bedrock", "bedrock", "", "AWS_SECRET_ACCESS_KEY", auth="sigv4",
                 options={"region": "us-east-1"}),
    CatalogEntry("cohere", "cohere", "https://api.cohere.com/v2", "COHERE_API_KEY",
                 models=("command-a-03-2025", "command-r-plus")),
    # OpenAI-compatible clouds.
    _openai("groq", "https://api.groq.com/openai/v1", "GROQ_API_KEY", "llama-3.3-70b-versatile"),
    _openai("mistral", "https://api.mistral.ai/v1", "MISTRAL_API_KEY", "mistral-large-latest"),
    _openai("deepseek", "https://api.deepseek.com/v1", "DEEPSEEK_API_KEY", "deepseek-chat"),
    _openai("together", "https://api.together.xyz/v1", "TOGETHER_API_KEY"),
    _openai("fireworks", "https://api.fireworks.ai/inference/v1", "FIREWORKS_API_KEY"),
    _openai("xai", "https://api.x.ai/v1", "XAI_API_KEY", "grok-4"),
    _openai("perplexity", "https://api.perplexity.ai", "PERPLEXITY_API_KEY", "sonar"),
    _openai("openrouter", "https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    _openai("deepinfra", "https://api.deepinfra.com/v1/openai", "DEEPINFRA_API_KEY"),
    _openai("cerebras", "https://api.cerebras.ai/v1", "CEREBRAS_API_KEY"),
    _openai("sambanova", "https://api.sambanova.ai/v1", "SAMBANOVA_API_KEY"),
    _openai("nvidia_nim", "https://integrate.api.nvidia.com/v1", "NVIDIA_API_KEY"),
    _openai("anyscale", "https://api.endpoints.anyscale.com/v1", "ANYSCALE_API_KEY"),
    _openai("hyperbolic", "https://api.hyperbolic.xyz/v1", "HYPERBOLIC_API_KEY"),
    _openai("novita", "https://api.novita.ai/v3/openai", "NOVITA_API_KEY"),
    _openai("lambda", "https://api.lambda.ai/v1", "LAMBDA_API_KEY"),
    _openai("nebius", "https://api.studio.nebius.com/v1", "NEBIUS_API_KEY"),
    _openai("featherless", "https://api.featherless.ai/v1", "FEATHERLESS_API_KEY"),
    _openai("moonshot", "https://api.moonshot.ai/v1", "MOONSHOT_API_KEY"),
    _openai("dashscope", "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
            "DASHSCOPE_API_KEY"),
    _openai("zhipu", "https://open.bigmodel.cn/api/paas/v4", "ZHIPUAI_API_KEY"),
    _openai("yi", "https://api.lingyiwanwu.com/v1", "YI_API_KEY"),
    _openai("minimax", "https://api.minimax.io/v1", "MINIMAX_API_KEY"),
    _openai("stepfun", "https://api.stepfun.com/v1", "STEPFUN_API_KEY"),
    _openai("volcengine", "https://ark.cn-beijing.volces.com/api/v3", "ARK_API_KEY"),
    _openai("siliconflow", "https://api.siliconflow.cn/v1", "SILICONFLOW_API_KEY"),
    _openai("github", "https://models.github.ai/inference", "GITHUB_TOKEN"),
    _openai("huggingface", "https://router.huggingface.co/v1", "HF_TOKEN"),
    _openai("friendli", "https://api.friendli.ai/serverless/v1", "FRIENDLI_TOKEN"),
    _openai("ai21", "https://api.ai21.com/studio/v1", "AI21_API_KEY"),
    _openai("upstage", "https://api.upstage.ai/v1", "UPSTAGE_API_KEY"),
    _openai("aimlapi", "https://api.aimlapi.com/v1", "AIMLAPI_API_KEY"),
    _openai("inference_net", "https://api.inference.net/v1", "INFERENCE_API_KEY"),
    _openai("chutes", "https://llm.chutes.ai/v1", "CHUTES_API_KEY"),
    _openai("scaleway", "https://api.scaleway.ai/v1", "SCW_SECRET_KEY"),
    _openai("ovhcloud", "https://oai.endpoints.kepler.ai.cloud.ovh.net/v1",
            "OVH_AI_ENDPOINTS_ACCESS_TOKEN"),
    _openai("venice", "https://api.venice.ai/api/v1", "VENICE_API_KEY"),
    _openai("kluster", "https://api.kluster.ai/v1", "KLUSTER_API_KEY"),
    _openai("nscale", "https://inference.api.nscale.com/v1", "NSCALE_SERVICE_TOKEN"),
    _openai("baseten", "https://inference.baseten.co/v1", "BASETEN_API_KEY"),
    _openai("parasail", "https://api.parasail.io/v1", "PARASAIL_API_KEY"),
    _openai("vercel", "https://ai-gateway.vercel.sh/v1", "AI_GATEWAY_API_KEY"),
    _openai("voyage", "https://api.voyageai.com/v1", "VOYAGE_API_KEY", "voyage-3.5"),
    _openai("jina", "https://api.jina.ai/v1", "JINA_API_KEY", "jina-embeddings-v3"),
    _openai("cloudflare", "", "CLOUDFLARE_API_TOKEN"),
    _openai("databricks", "", "DATABRICKS_TOKEN"),
    _openai("azure_ai", "", "AZURE_AI_API_KEY"),
    # Self-hosted OpenAI-compatible servers on this machine by default.
    _local("ollama", "http://127.0.0.1:11434/v1", "OLLAMA_API_KEY"),
    _local("vllm", "http://127.0.0.1:8000/v1", "VLLM_API_KEY"),
    _local("lmstudio", "http://127.0.0.1:1234/v1", "LMSTUDIO_API_KEY"),
    _local("llamacpp", "http://127.0.0.1:8080/v1", "LLAMACPP_API_KEY"),
    _local("tgi", "http://127.0.0.1:3000/v1", "TGI_API_KEY"),
    _local("localai", "http://127.0.0.1:8080/v1", "LOCALAI_API_KEY"),
    _local("sglang", "http://127.0.0.1:30000/v1", "SGLANG_API_KEY"),
)  # fmt: skip

BY_NAME: dict[str, CatalogEntry] = {entry.name: entry for entry in CATALOG}
