"""Drive creditgate with the real OpenAI Python SDK: only base_url and the
API key differ from talking to OpenAI directly.

Usage: openai_client.py BASE_URL API_KEY
Prints one JSON object with what the SDK returned.
"""

import json
import sys

from openai import OpenAI


def main() -> None:
    base_url, api_key = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)

    plain = client.chat.completions.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": "hello from the SDK"}],
        max_tokens=12,
        seed=5,
    )
    streamed = []
    stream = client.chat.completions.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": "stream please"}],
        max_tokens=7,
        stream=True,
    )
    saw_usage_chunk = False
    for chunk in stream:
        if chunk.usage is not None:
            saw_usage_chunk = True
        for choice in chunk.choices:
            if choice.delta.content:
                streamed.append(choice.delta.content)

    refused = None
    try:
        OpenAI(base_url=base_url, api_key="cg_not_a_key", max_retries=0).chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "x"}]
        )
    except Exception as error:  # the SDK raises its AuthenticationError
        refused = type(error).__name__

    print(
        json.dumps(
            {
                "plain_content": plain.choices[0].message.content,
                "plain_usage": [plain.usage.prompt_tokens, plain.usage.completion_tokens],
                "streamed": "".join(streamed),
                "saw_usage_chunk": saw_usage_chunk,
                "refused": refused,
            }
        )
    )


if __name__ == "__main__":
    main()
