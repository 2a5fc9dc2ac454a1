/** A small typed event emitter: on() returns a function that removes the listener. */
export class Emitter<Events> {
  private _listeners: { [K in keyof Events]?: Set<(arg: Events[K]) => void> } = {};

  /** Call `fn` on every `event`; returns a function that removes it (as `off` does). */
  on<K extends keyof Events>(event: K, fn: (arg: Events[K]) => void): () => void {
    (this._listeners[event] ||= new Set()).add(fn);
    return () => this.off(event, fn);
  }

  /** Remove a listener added with `on`. */
  off<K extends keyof Events>(event: K, fn: (arg: Events[K]) => void): void {
    this._listeners[event]?.delete(fn);
  }

  /** @internal Call the listeners of `event`; a throwing listener is logged, not propagated. */
  _emit<K extends keyof Events>(event: K, arg: Events[K]): void {
    const set = this._listeners[event];
    if (!set) return;
    for (const fn of Array.from(set)) {
      try {
        fn(arg);
      } catch (err) {
        console.error("[pushsvc] " + String(event) + " listener failed", err);
      }
    }
  }
}
