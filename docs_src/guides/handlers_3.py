@api.stream("ai.complete", scope="ai:use", rate_limit="10/minute")
async def complete(ctx: Context, data: Prompt):
    async for piece in generate(data.prompt, data.max_words):   # your model's token stream
        yield {"text": piece}                                   # → one chunk frame
