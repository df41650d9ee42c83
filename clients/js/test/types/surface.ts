// The documented surface, written as an application would: `npm run typecheck` compiles it against the declarations.
import { Client, AuthError, RequestError, RateLimitedError, CloseError, type ChannelMessage, type State } from "secure-ws-client";
import { WebSocket } from "ws";

declare function fetchToken(): Promise<string>;

export async function app(signal: AbortSignal): Promise<void> {
  const client = new Client("wss://api.example.com/ws", { getToken: async () => fetchToken(), WebSocket });
  const off = client.on("state", (s: State) => void s);
  client.on("push", (data: unknown) => void data);
  client.on("error", (err: unknown) => {
    if (err instanceof AuthError) console.log(err.code, err.reason);
    else if (err instanceof CloseError) console.log(err.code);
  });
  off();
  await client.connect();
  try {
    const out = await client.call("orders.create", { items: [1] }, { timeout: 5000 });
    void out;
  } catch (e) {
    if (e instanceof RateLimitedError) console.log(e.retryAfterMs, e.code);
    else if (e instanceof RequestError) console.log(e.code, e.message);
  }
  for await (const data of client.stream("ai.complete", { prompt: "hi" }, { signal })) void data;
  const sub = client.subscribe("room.lobby", {
    onMessage: (m: ChannelMessage) => console.log(m.channel, m.data, m.from, m.offset, m.epoch),
    onRecoveryFailed: (channel: string) => void channel,
    joinLeave: true,
    onJoin: (e) => console.log(e.sub, e.connection_id),
    onLeave: (e) => console.log(e.channel),
    since: { offset: 3, epoch: "e" },
  });
  await sub.ready;
  sub.unsubscribe();
  await client.publish("room.lobby", { text: "hi" });
  const { messages, offset, epoch } = await client.history("room.lobby", { limit: 10 });
  const { clients } = await client.presence("room.lobby");
  void [messages, offset, epoch, clients];
  client.close();
}
