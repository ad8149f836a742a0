//! Macros shared by the middleware of tower-mqtt's crates.

/// Defines `get_ref`, `get_mut` and `into_inner` for a middleware service whose
/// wrapped service is the field `inner` of type `S`.
///
/// Use it inside the service's inherent `impl` block:
///
/// ```ignore
/// impl<S> Decode<S> {
///     define_inner_service_accessors!();
/// }
/// ```
#[doc(hidden)]
#[macro_export]
macro_rules! define_inner_service_accessors {
    () => {
        /// The wrapped service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The wrapped service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Consumes `self`, handing back the wrapped service.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}
