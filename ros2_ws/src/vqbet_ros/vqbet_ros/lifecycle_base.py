"""The managed (lifecycle) node base of policy_node and recorder_node.

Why: nodes that drive hardware or own a dataset follow ROS 2's managed-node state machine, so a lifecycle
manager, ``ros2 lifecycle set`` or a launch file can load them first and let them act later. One base maps
the transitions the same way for both nodes; each node fills in five hooks:

- ``configure()``: load what the node needs (model, store) and create its topics, services and timers. A
  failure (``VqbetError``: one line) fails the transition, back to ``unconfigured``; whatever the hook had
  created is released and destroyed again.
- ``activate()`` / ``deactivate()``: start / stop acting (command the arm, accept episodes). A
  ``VqbetError`` in ``activate()`` refuses the transition with its line (``transition_error``).
- ``release()``: leave things safe (the policy's hold, the recorder's commit) and free what configure
  loaded. Runs once per configure: on ``cleanup``, ``shutdown``, after an error, or from :meth:`shut_down`.

:meth:`bring_up` (called by :func:`vqbet_ros.node_main.run_node`) configures the node and activates it when
:meth:`start_active` says so: a plain ``ros2 run`` / ``python -m`` starts as before, without a lifecycle
manager. :meth:`shut_down` is run_node's cleanup: the ``shutdown`` transition, and ``release()`` whatever
state the machine is in, so the shutdown guarantees never depend on it.
"""

from __future__ import annotations

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from vqbet_core.errors import VqbetError

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE
_KINDS = ("subscriptions", "publishers", "services", "clients", "timers")


class ManagedNode(LifecycleNode):
    """A ``LifecycleNode`` whose transitions call the hooks above; see the module docstring."""

    def __init__(self, node_name: str, **kwargs):
        super().__init__(node_name, **kwargs)
        self.transition_error = ""  # why the last configure / activate failed
        self._owned: dict[str, list] = {}  # what configure() created: destroyed on cleanup
        self._released = True  # nothing to release before a configure
        self._starting = False  # inside bring_up: run_node reports a failure as one line, no log
        self._guard_change_state()

    # ------------------------------------------------------------------ hooks (subclasses)
    def configure(self) -> None:
        raise NotImplementedError

    def activate(self) -> None:
        pass

    def deactivate(self) -> None:
        pass

    def release(self) -> None:
        pass

    def start_active(self) -> bool:
        """Whether :meth:`bring_up` activates the node (its startup parameter)."""
        return False

    def ready_message(self, activated: bool | None) -> str:
        """The ``ready: ...`` line once spinning; ``activated`` is None when the node was not asked to."""
        return f"ready: {self.lifecycle_state}"

    def state_changed(self) -> None:
        """After a transition, once the executor runs (e.g. publish diagnostics); only while configured."""

    # ------------------------------------------------------------------ state
    @property
    def lifecycle_state(self) -> str:
        """unconfigured, inactive, active, finalized (or a transition state while one runs)."""
        return self._state_machine.current_state[1]

    def is_finalized(self) -> bool:
        return self.lifecycle_state == "finalized"

    def bring_up(self) -> None:
        """configure, then activate when :meth:`start_active`; a configure failure raises ``VqbetError``."""
        self._starting = True
        try:
            if self.trigger_configure() != SUCCESS:
                raise VqbetError(self.transition_error or "configure failed")
            activated = None
            if self.start_active():
                activated = self.trigger_activate() == SUCCESS
            message = self.ready_message(activated)
        finally:
            self._starting = False
        self._once(lambda: self.get_logger().info(message))  # once spinning: the services answer from then on

    def shut_down(self) -> None:
        """run_node's cleanup: the shutdown transition from any state, and ``release()`` in any case."""
        try:
            if self.lifecycle_state in ("unconfigured", "inactive", "active"):
                self.trigger_shutdown()
        except Exception as exc:  # noqa: BLE001 - the release below must run
            self.get_logger().error(f"lifecycle shutdown: {type(exc).__name__}: {exc}")
        finally:
            self._release()

    # ------------------------------------------------------------------ transitions
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        before = self._entities()
        self._released = False
        try:
            self.configure()
        except Exception as exc:  # noqa: BLE001 - a failed configure leaves nothing behind
            self.transition_error = str(exc) if isinstance(exc, VqbetError) else f"{type(exc).__name__}: {exc}"
            self._release()
            self._destroy(self._new_since(before))
            if not self._starting:
                self.get_logger().warning(f"configure failed: {self.transition_error}")
            return FAILURE
        self._owned = self._new_since(before)
        self.transition_error = ""
        return self._done("configured", "inactive")

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.activate()
        except VqbetError as exc:
            self.transition_error = str(exc)
            if not self._starting:
                self.get_logger().warning(f"activate refused: {exc}")
            return FAILURE
        self.transition_error = ""
        return self._done("activated", "active")

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.deactivate()
        except Exception as exc:  # noqa: BLE001 - the hook stops acting first; inactive is where it ends
            self.get_logger().error(f"deactivate: {type(exc).__name__}: {exc}")
        return self._done("deactivated", "inactive")

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._destroy(self._owned)
        self._owned = {}
        self.get_logger().info("lifecycle: cleaned up -> unconfigured")
        return SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("lifecycle: shut down -> finalized")
        return SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._destroy(self._owned)
        self._owned = {}
        self.get_logger().error("lifecycle: error in a transition: released -> unconfigured")
        return SUCCESS

    # ------------------------------------------------------------------ helpers
    def _done(self, verb: str, target: str) -> TransitionCallbackReturn:
        if not self._starting:
            self.get_logger().info(f"lifecycle: {verb} -> {target}")
        self._once(lambda: self.state_changed() if not self._released else None)
        return SUCCESS

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self.release()
        except Exception as exc:  # noqa: BLE001 - shutdown goes on
            self.get_logger().error(f"release: {type(exc).__name__}: {exc}")

    def _once(self, callback) -> None:
        """``callback`` on the executor's next turn (after the transition has reached its state)."""
        timer = None

        def fire():
            timer.cancel()
            self.destroy_timer(timer)
            callback()

        timer = self.create_timer(0.001, fire)

    def _entities(self) -> dict[str, set[int]]:
        return {kind: {id(e) for e in getattr(self, kind)} for kind in _KINDS}

    def _new_since(self, before: dict[str, set[int]]) -> dict[str, list]:
        return {kind: [e for e in getattr(self, kind) if id(e) not in before[kind]] for kind in _KINDS}

    def _destroy(self, entities: dict[str, list]) -> None:
        for kind, items in entities.items():
            destroy = getattr(self, f"destroy_{kind[:-1]}")
            for entity in items:
                destroy(entity)

    def _guard_change_state(self) -> None:
        """A transition not valid from the current state (``configure`` twice, a raw ChangeState call) answers
        ``success: false`` instead of raising inside the executor."""
        service = getattr(self, "_service_change_state", None)
        if service is None:
            return
        inner = service.callback

        def guarded(request, response):
            try:
                return inner(request, response)
            except Exception as exc:  # noqa: BLE001 - rclpy raises RCLError for an invalid transition
                self.get_logger().warning(f"change_state {request.transition.label or request.transition.id} "
                                          f"refused in state {self.lifecycle_state}: {str(exc).splitlines()[0]}")
                response.success = False
                return response

        service.callback = guarded
