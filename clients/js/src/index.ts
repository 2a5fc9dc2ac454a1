/**
 * pushsvc: the client of the pushsvc real-time push service (wire protocol v1, docs/protocol.md).
 * No runtime dependencies; browsers and Node >= 20.
 */
export { PushsvcClient } from "./client.js";
export { PushsvcError, UnauthorizedError } from "./errors.js";
export type { ErrorCode } from "./errors.js";
export { Subscription } from "./subscription.js";
export type {
  ClientState,
  SubscriptionState,
  TransportName,
  WebSocketConstructor,
  WebSocketLike,
  WelcomeFrame,
  SubscribedFrame,
  UnsubscribedFrame,
  PublishedFrame,
  PublishOptions,
  Publisher,
  RpcResultFrame,
  RefreshedFrame,
  PresenceClient,
  PresenceFrame,
  PresenceStatsFrame,
  MessageContext,
  MessageEvent,
  MemberEvent,
  DisconnectedEvent,
  StateEvent,
  TransportEvent,
  SubscriptionStateEvent,
  ClientEvents,
  SubscriptionEvents,
  Frame,
  PushsvcOptions,
  SubscribeOptions,
  MessageHandler,
} from "./types.js";
