/** Error codes of `error` frames (docs/protocol.md) and of the client itself. */
export type ErrorCode =
  | "bad_request"
  | "unauthorized"
  | "forbidden"
  | "invalid_channel"
  | "rate_limited"
  | "limit_exceeded"
  | "unavailable"
  | "not_connected"
  | "disconnected"
  | "unsubscribed"
  | (string & {});

/**
 * A refused request or subscription: `code` is the server's error code (bad_request, forbidden,
 * invalid_channel, rate_limited, limit_exceeded, unavailable, ...) or a client one (not_connected,
 * disconnected, unsubscribed); `retryAfter` is seconds (from `retry_after`).
 */
export class PushsvcError extends Error {
  code: ErrorCode;
  retryAfter?: number;
  id?: number | string;
  channel?: string;

  constructor(code: ErrorCode, message?: string, extra?: { retryAfter?: number; id?: number | string; channel?: string }) {
    super(message || code);
    this.name = "PushsvcError";
    this.code = code;
    if (extra) Object.assign(this, extra);
  }
}

/**
 * Throw it from `getToken` when the user may not connect (e.g. the backend answered 401/403):
 * the client stops reconnecting (state `disconnected`, `disconnected` event with code 4001).
 * Any other error thrown by getToken is reported on `error` and retried with backoff.
 */
export class UnauthorizedError extends Error {
  constructor(message?: string) {
    super(message || "unauthorized");
    this.name = "UnauthorizedError";
  }
}
