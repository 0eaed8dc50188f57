"""SigV4 signing, held to AWS's published test vectors and to botocore's SigV4Auth."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from botocore import auth as botocore_auth
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotocoreCredentials
from botocore.utils import percent_encode

from llmkit.providers import sigv4
from llmkit.providers.base import Provider
from llmkit.providers.bedrock import endpoint

# The aws-sig-v4-test-suite's example credentials and clock (20150830T123600Z).
SUITE = sigv4.Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE_NOW = datetime(2015, 8, 30, 12, 36, tzinfo=timezone.utc)
SUITE_PREFIX = (
    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature="
)

MODEL_IDS = [
    "anthropic.claude-3-5-sonnet-20240620-v1:0",
    "us.meta.llama3-2-90b-instruct-v1:0",
    "amazon.nova-pro-v1:0",
    "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-haiku-20240307-v1:0",
]
BODY = b'{"messages":[{"role":"user","content":[{"text":"h\xc3\xa9"}]}]}'


def suite_sign(method: str, url: str) -> str:
    headers = sigv4.sign(
        method, url, {}, b"", SUITE, region="us-east-1", service="service", now=SUITE_NOW
    )
    return headers["Authorization"]


@pytest.mark.parametrize(
    ("name", "method", "url", "signature"),
    [
        ("get-vanilla", "GET", "https://example.amazonaws.com/",
         "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        ("post-vanilla", "POST", "https://example.amazonaws.com/",
         "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
        ("get-vanilla-query-order-key-case", "GET",
         "https://example.amazonaws.com/?Param2=value2&Param1=value1",
         "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
        ("get-utf8", "GET", "https://example.amazonaws.com/\u1234",
         "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85"),
    ],
)  # fmt: skip
def test_aws_published_vectors(name: str, method: str, url: str, signature: str) -> None:
    assert suite_sign(method, url) == SUITE_PREFIX + signature


def test_get_vanilla_canonical_request_and_string_to_sign() -> None:
    """The intermediate forms the suite publishes for get-vanilla."""
    names, block = sigv4.canonical_headers(
        {"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z"}
    )
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    canonical = sigv4.canonical_request("GET", "/", "", block, names, empty)
    assert canonical == (
        "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
        f"host;x-amz-date\n{empty}"
    )
    scope = sigv4.credential_scope("20150830", "us-east-1", "service")
    assert sigv4.string_to_sign("20150830T123600Z", scope, canonical) == (
        "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
        "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
    )


def test_canonical_uri_encodes_the_sent_path_again() -> None:
    assert sigv4.canonical_uri("/model/a.b-v1%3A0/converse") == "/model/a.b-v1%253A0/converse"
    assert sigv4.canonical_uri("/model/a.b-v1:0/converse") == "/model/a.b-v1%3A0/converse"
    assert sigv4.canonical_uri("/a/./b/../c//d/") == "/a/c/d/"
    assert sigv4.canonical_uri("") == "/"


def botocore_sign(
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    headers: dict[str, str],
    body: bytes,
    credentials: sigv4.Credentials,
    region: str,
    now: datetime,
) -> AWSRequest:
    """What botocore's SigV4Auth sends for the same request at the same instant."""
    fixed = now.astimezone(timezone.utc).replace(tzinfo=None)
    monkeypatch.setattr(botocore_auth, "get_current_datetime", lambda *_, **__: fixed)
    request = AWSRequest(method="POST", url=url, headers=dict(headers), data=body)
    key = BotocoreCredentials(
        credentials.access_key_id, credentials.secret_access_key, credentials.session_token
    )
    SigV4Auth(key, "bedrock", region).add_auth(request)
    return request


@pytest.mark.parametrize("model_id", MODEL_IDS)
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEJr//////////wEaDM+token=="])
@pytest.mark.parametrize(
    ("base_url", "region"),
    [("", "us-east-1"), ("", "eu-central-1"), ("http://127.0.0.1:8123", "us-west-2")],
)
@pytest.mark.parametrize("path_form", ["as-aiohttp-sends", "as-botocore-sends"])
def test_bedrock_requests_sign_like_botocore(
    monkeypatch: pytest.MonkeyPatch,
    model_id: str,
    token: str | None,
    base_url: str,
    region: str,
    path_form: str,
) -> None:
    provider = Provider("bedrock", "bedrock", base_url, auth="sigv4")
    url = endpoint(provider, region, model_id, "converse-stream")
    if path_form == "as-botocore-sends":  # botocore percent-encodes the label, ':' too
        url = url.split("/model/")[0] + f"/model/{percent_encode(model_id)}/converse-stream"
    credentials = sigv4.Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPx", token)
    headers = {"Content-Type": "application/json", "Accept": "application/vnd.amazon.eventstream",
               "X-Custom-Header": "  spaced   out  value "}  # fmt: skip
    now = datetime(2024, 2, 29, 23, 59, 58, tzinfo=timezone(timedelta(hours=-5)))

    ours = sigv4.sign("POST", url, headers, BODY, credentials, region=region, service="bedrock",
                      now=now)  # fmt: skip
    theirs = botocore_sign(monkeypatch, url, headers, BODY, credentials, region, now)

    assert ours["Authorization"] == theirs.headers["Authorization"]
    assert ours["X-Amz-Date"] == theirs.headers["X-Amz-Date"] == "20240301T045958Z"
    assert ours.get("X-Amz-Security-Token") == theirs.headers.get("X-Amz-Security-Token")
    assert ("x-amz-security-token" in ours["Authorization"]) == (token is not None)


def test_the_body_is_part_of_the_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "https://bedrock-runtime.us-east-1.amazonaws.com/model/m.x-v1:0/converse"
    one = sigv4.sign("POST", url, {}, b"{}", SUITE, region="us-east-1", service="bedrock",
                     now=SUITE_NOW)  # fmt: skip
    two = sigv4.sign("POST", url, {}, b"{ }", SUITE, region="us-east-1", service="bedrock",
                     now=SUITE_NOW)  # fmt: skip
    assert one["Authorization"] != two["Authorization"]


def test_stale_auth_headers_are_replaced_and_unsignable_ones_kept_unsigned() -> None:
    headers = {"Authorization": "old", "x-amz-date": "19990101T000000Z", "User-Agent": "llmkit"}
    signed = sigv4.sign("GET", "https://example.amazonaws.com/", headers, b"", SUITE,
                        region="us-east-1", service="service", now=SUITE_NOW)  # fmt: skip
    assert signed["Authorization"] == SUITE_PREFIX + (
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )
    assert signed["User-Agent"] == "llmkit" and "x-amz-date" not in signed


def test_host_header_drops_default_ports_only() -> None:
    assert sigv4.host_header("https://Bedrock-Runtime.us-east-1.amazonaws.com/x") == (
        "bedrock-runtime.us-east-1.amazonaws.com"
    )
    assert sigv4.host_header("https://h.example:443/") == "h.example"
    assert sigv4.host_header("http://127.0.0.1:8080/") == "127.0.0.1:8080"


def test_credentials_never_print_their_secrets() -> None:
    shown = repr(sigv4.Credentials("AKID", "very-secret", "session-secret"))
    assert "AKID" in shown and "very-secret" not in shown and "session-secret" not in shown
