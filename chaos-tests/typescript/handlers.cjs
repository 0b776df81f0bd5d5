// Handlers written with Restate's TypeScript SDK, for Ferry's compatibility tests.
//
// Plain JavaScript (CommonJS), so that Node runs it as it is:
//   NODE_PATH=target/typescript-sdk/node_modules PORT=9080 node handlers.cjs
// The SDK serves HTTP/2 without TLS and announces bidirectional streaming.

const restate = require("@restatedev/restate-sdk");

const { TerminalError } = restate;

/// The failure of a completion as a value: `{code, message}`.
const failure = (e) => ({ code: e.code, message: e.message });

/// Tries of `TsSteps/retry`'s step, by invocation id.
const stepTries = new Map();

const counter = restate.object({
  name: "TsCounter",
  handlers: {
    /// Adds one to the key's count and returns it.
    add: async (ctx) => {
      const count = ((await ctx.get("count")) ?? 0) + 1;
      ctx.set("count", count);
      return count;
    },
    get: restate.handlers.object.shared(async (ctx) => ({
      count: (await ctx.get("count")) ?? 0,
      keys: (await ctx.stateKeys()).sort(),
    })),
    /// Sets `note` and clears `count`, then clears everything if asked.
    clear: async (ctx, input) => {
      ctx.set("note", "kept");
      ctx.clear("count");
      if (input && input.all) {
        ctx.clearAll();
      }
    },
  },
});

const steps = restate.service({
  name: "TsSteps",
  handlers: {
    /// Three named steps and a sleep; each step's result is journaled once.
    run: async (ctx, input) => {
      const results = [];
      for (const name of ["one", "two", "three"]) {
        results.push(await ctx.run(name, () => `${name}:${input.tag}`));
      }
      await ctx.sleep(50);
      const uuid = ctx.rand.uuidv4();
      return { results, uuid };
    },
    /// Fails for good with the code and message of its input.
    fail: async (_ctx, input) => {
      throw new TerminalError(input.message, { errorCode: input.code });
    },
    /// A step that fails `failures` times before it succeeds, retried by the SDK.
    /// The step may run in several attempts of the invocation, so its tries are counted here.
    retry: async (ctx, input) => {
      const id = ctx.request().id.toString();
      return ctx.run(
        "flaky",
        () => {
          const tries = (stepTries.get(id) ?? 0) + 1;
          stepTries.set(id, tries);
          if (tries <= input.failures) {
            throw new Error(`try ${tries} fails`);
          }
          return tries;
        },
        { initialRetryInterval: 10, maxRetryAttempts: input.failures + 1 },
      );
    },
  },
});

/// Each hop counts its invocations and calls the next key of its path.
const hop = restate.object({
  name: "TsHop",
  handlers: {
    hop: async (ctx, input) => {
      ctx.set("hits", ((await ctx.get("hits")) ?? 0) + 1);
      const trail = [...input.trail, ctx.key];
      if (input.path.length === 0) {
        return trail;
      }
      const [next, ...path] = input.path;
      return ctx.objectClient(hop, next).hop({ path, trail });
    },
    hits: restate.handlers.object.shared(async (ctx) => (await ctx.get("hits")) ?? 0),
  },
});

/// An append-only list per key.
const list = restate.object({
  name: "TsList",
  handlers: {
    append: async (ctx, value) => {
      const items = (await ctx.get("items")) ?? [];
      items.push(value);
      ctx.set("items", items);
      return items.length;
    },
    get: restate.handlers.object.shared(async (ctx) => (await ctx.get("items")) ?? []),
  },
});

const sender = restate.service({
  name: "TsSender",
  handlers: {
    /// Sends 0..n to `key`'s list, `n` delayed by `delay` ms before them all.
    send: async (ctx, input) => {
      const target = ctx.objectSendClient(list, input.key);
      target.append(input.n, restate.rpc.sendOpts({ delay: { milliseconds: input.delay } }));
      for (let i = 0; i < input.n; i++) {
        target.append(i);
      }
      return input.n + 1;
    },
  },
});

/// Calls for `{seq}`: `TsCounter/add` of keys f{seq % 10} and g{seq % 7}, at once.
const fanout = restate.service({
  name: "TsFanout",
  handlers: {
    call: async (ctx, input) => {
      const keys = input.keys ?? [`f${input.seq % 10}`, `g${input.seq % 7}`];
      const calls = keys.map((key) => ctx.objectClient(counter, key).add());
      const results = await restate.RestatePromise.all(calls);
      return { keys, results };
    },
    /// Sends `TsCounter/add` to `key` and attaches to that invocation.
    attach: async (ctx, input) => {
      const handle = ctx.objectSendClient(counter, input.key).add();
      const id = await handle.invocationId;
      return { id, result: await ctx.attach(id) };
    },
  },
});

/// Notes awakeable ids and invocation ids under a key, for tests to read.
const board = restate.object({
  name: "TsBoard",
  handlers: {
    put: async (ctx, id) => {
      ctx.set("id", id);
    },
    get: restate.handlers.object.shared(async (ctx) => (await ctx.get("id")) ?? null),
  },
});

/// `{ value }` once `promise` resolves, or the terminal error it fails with.
const settled = async (promise) => {
  try {
    return { value: await promise };
  } catch (e) {
    if (e instanceof TerminalError) {
      return failure(e);
    }
    throw e;
  }
};

/// Waits on an awakeable whose id it notes on the board under its key.
const waitOnAwakeable = async (ctx) => {
  const { id, promise } = ctx.awakeable();
  ctx.objectSendClient(board, ctx.key).put(id);
  return settled(promise);
};

const awake = restate.object({
  name: "TsAwake",
  handlers: {
    wait: waitOnAwakeable,
    complete: restate.handlers.object.shared(async (ctx, input) => {
      if (input.reject !== undefined) {
        ctx.rejectAwakeable(input.id, input.reject);
      } else {
        ctx.resolveAwakeable(input.id, input.value);
      }
    }),
    /// Waits for the named signal `go`, its invocation id noted on the board.
    signal: async (ctx) => {
      ctx.objectSendClient(board, ctx.key).put(ctx.request().id);
      return { value: await ctx.signal("go") };
    },
    /// Sends the signal `go` with `value` to the invocation `id`.
    send: restate.handlers.object.shared(async (ctx, input) => {
      ctx.invocation(restate.InvocationIdParser.fromString(input.id)).signal("go").resolve(input.value);
    }),
  },
});

/// Calls `TsAwake/{key}/wait` and returns what the call ends with.
const parent = restate.service({
  name: "TsParent",
  handlers: {
    call: async (ctx, input) => settled(ctx.objectClient(awake, input.key).wait()),
  },
});

const approval = restate.workflow({
  name: "TsApproval",
  handlers: {
    run: async (ctx, input) => {
      ctx.set("stage", "waiting");
      const decision = await ctx.promise("decision");
      ctx.set("stage", "decided");
      return { input, decision };
    },
    decide: async (ctx, decision) => {
      await ctx.promise("decision").resolve(decision);
    },
    peek: async (ctx) => ({
      decision: (await ctx.promise("decision").peek()) ?? null,
      stage: (await ctx.get("stage")) ?? null,
    }),
  },
});

/// Lazy state: the object starts without its state and reads what it needs.
const lazy = restate.object({
  name: "TsLazy",
  options: { enableLazyState: true },
  handlers: {
    add: async (ctx, input) => {
      ctx.set(input.name, ((await ctx.get(input.name)) ?? 0) + 1);
      return (await ctx.stateKeys()).sort();
    },
    get: restate.handlers.object.shared(async (ctx, name) => (await ctx.get(name)) ?? null),
  },
});

/// Waits on an awakeable with its attempt held open for 10 s of silence
/// (the manifest's `inactivityTimeout`).
const patient = restate.object({
  name: "TsPatient",
  options: { inactivityTimeout: 10_000 },
  handlers: { wait: waitOnAwakeable },
});

/// A step that takes 3 s, in a service whose attempts close their request
/// after 200 ms of silence and are aborted 1 s later.
const stuck = restate.service({
  name: "TsStuck",
  options: { inactivityTimeout: 200, abortTimeout: 1_000 },
  handlers: {
    nap: async (ctx) => ctx.run("nap", () => new Promise((wake) => setTimeout(() => wake("rested"), 3_000))),
  },
});

restate
  .serve({
    services: [counter, steps, hop, list, sender, fanout, board, awake, parent, approval, lazy, patient, stuck],
    port: Number(process.env.PORT ?? 9080),
  })
  .then((port) => console.log(`listening on ${port}`));
