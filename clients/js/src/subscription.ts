import { Emitter } from "./emitter.js";
import type { PushsvcError } from "./errors.js";
import type {
  MessageHandler,
  SubscribedFrame,
  SubscriptionEvents,
  SubscriptionState,
  UnsubscribedFrame,
} from "./types.js";

/**
 * @internal One subscribed channel (or pattern) of a client, shared by every Subscription of that
 * name: its position (epoch, highest seq), state and `ready` promise.
 */
export interface Entry {
  channel: string;
  subs: Set<Subscription<any>>;
  lastSeq: number | null;
  epoch: string | null;
  confirmed: boolean;
  /** Confirmed on the current HTTP stream: reopened with the stream's cursor. */
  onStream: boolean;
  state: SubscriptionState;
  ready: Promise<SubscribedFrame>;
  resolve: (f: SubscribedFrame) => void;
  reject: (e: PushsvcError) => void;
}

/** @internal What a Subscription needs from its client. */
export interface Owner {
  _channels: Map<string, Entry>;
  _removeSubscription(e: Entry, s: Subscription<any>): Promise<UnsubscribedFrame | null>;
}

/**
 * Returned by client.subscribe(): one handler on one channel or pattern. `ready` resolves with the
 * `subscribed` frame, or rejects with a PushsvcError (forbidden, invalid_channel, limit_exceeded,
 * unsubscribed, ...). Events: `state`, `subscribed` (every (re)subscription), `error`.
 */
export class Subscription<T = unknown> extends Emitter<SubscriptionEvents> {
  /** The channel or pattern, as subscribed. */
  readonly channel: string;
  /** @internal */ readonly _handler: MessageHandler<T>;
  private _client: Owner;
  private _entry: Entry;
  private _active = true;

  /** @internal */
  constructor(client: Owner, entry: Entry, handler: MessageHandler<T>) {
    super();
    this.channel = entry.channel;
    this._client = client;
    this._entry = entry;
    this._handler = handler;
  }

  /** Resolves with the first `subscribed` frame; rejects with a PushsvcError. */
  get ready(): Promise<SubscribedFrame> {
    return this._entry.ready;
  }

  /** True until unsubscribe(), or until the server removed or refused the channel. */
  get active(): boolean {
    return this._active && this._client._channels.get(this.channel) === this._entry;
  }

  /** `subscribing` (until `subscribed`, and while reconnecting), `subscribed`, or `unsubscribed`. */
  get state(): SubscriptionState {
    return this.active ? this._entry.state : "unsubscribed";
  }

  /**
   * Remove this handler; the last handler of a channel sends unsubscribe. Resolves with the
   * `unsubscribed` frame, or null when nothing was sent (other handlers remain, or not connected).
   */
  unsubscribe(): Promise<UnsubscribedFrame | null> {
    if (!this._active) return Promise.resolve(null);
    const old = this.state;
    this._active = false;
    if (old !== "unsubscribed") this._emit("state", { channel: this.channel, newState: "unsubscribed", oldState: old });
    return this._client._removeSubscription(this._entry, this);
  }
}
